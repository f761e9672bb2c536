"""What a bank folder holds, by name.

| file | what |
|---|---|
| `store-rank{r}.h5` | the memories of the references `id % world_size == r` (`HDF5Store`) |
| `quantizer.pt` | the trained `MemoryQuantizer` of a quantized bank (`bank.quantizer`) |
| `embedder/` | the fitted embedder (its `save`, for embedders that have one) |
| `index/` | the search index over every reference (`bank.index`, default `ExactIndex`) |
| `manifest.json` | shards, counts, fingerprints, dtype, quantizer, embedder and index |
| `edit-journal/` | an edit in progress (`m3 edit`): the bank is unfinished while it exists |
| `edit.lock` | the lock an edit holds while it runs (`flock`; the file itself stays) |
| `recipe.yaml`, `fingerprint`, `done.json` | the run folder (`done.json` written last) |
"""

from __future__ import annotations

import re

#: What the bank holds: shards, counts, fingerprints, its embedder and index.
MANIFEST = "manifest.json"
#: Written last: a bank without it is unfinished (the run folder's marker).
DONE = "done.json"
#: The journal of an edit in progress (`m3.bank.edit`): the bank is unfinished while it exists.
EDIT_JOURNAL = "edit-journal"
#: The lock an edit holds (`m3.bank.journal.edit_lock`).
EDIT_LOCK = "edit.lock"
#: The trained quantizer of a quantized bank, in the bank folder.
QUANTIZER = "quantizer.pt"
#: A shard's file name; its group is the rank that wrote it.
SHARD_FILE = re.compile(r"store-rank(\d+)\.h5$")


def shard_name(rank: int) -> str:
    """The file name of a rank's shard in a bank folder.

    Args:
        rank: The rank that writes the shard (0-based).

    Returns:
        `store-rank{rank}.h5`, e.g. `store-rank0.h5`.
    """
    return f"store-rank{rank}.h5"
