"""What a bank folder holds, by name.

| file | what |
|---|---|
| `store-rank{r}.h5` | the memories of the references `id % world_size == r` (`HDF5Store`) |
| `quantizer.pt` | the trained `MemoryQuantizer` of a quantized bank (`bank.quantizer`) |
| `embedder/` | the fitted embedder (its `save`, for embedders that have one) |
| `references/` | every reference's token ids and provenance, by id (`m3.bank.table`) |
| `index/` | the search index over every reference (`bank.index`, default `ExactIndex`) |
| `edits/edit-000n.h5` | the references edit `n` wrote (`m3 edit`; `m3.bank.layers`) |
| `index-000n/` | the index after edit `n`, once a bank is edited (`index/` is then gone) |
| `manifest.json` | shards, counts, fingerprints, dtype, quantizer, embedder, index, edits |
| `edit.lock` | the lock an edit holds while it runs (`flock`; the file itself stays) |
| `edit-journal/` | an in-place edit of an earlier m3, stopped (`m3 edit BANK --resume`) |
| `recipe.yaml`, `fingerprint`, `done.json` | the run folder (`done.json` written last) |
"""

from __future__ import annotations

import re
from typing import Any

#: What the bank holds: shards, counts, fingerprints, its embedder and index.
MANIFEST = "manifest.json"
#: Written last: a bank without it is unfinished (the run folder's marker).
DONE = "done.json"
#: An in-place edit in progress (earlier m3, `m3.bank.journal`): the bank is unfinished.
EDIT_JOURNAL = "edit-journal"
#: The bank's reference table: every reference's token ids and provenance (`m3.bank.table`).
TABLE = "references"
#: The folder of the layers edits write (`m3.bank.layers`).
EDIT_LAYERS = "edits"
#: The lock an edit holds (`m3.bank.layers.edit_lock`).
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


def index_path(manifest: dict[str, Any]) -> str:
    """The folder of a bank's current index, relative to the bank folder.

    Args:
        manifest: The bank's manifest.

    Returns:
        `index` for a bank as built, `index-000n` after its `n`-th edit.
    """
    return str(manifest.get("index", {}).get("path", "index"))


def layered_edits(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's edits that wrote a layer, oldest first.

    Edits of m3 versions that changed the shards in place record no layer: their changes
    are in the shards already.

    Args:
        manifest: The bank's manifest.

    Returns:
        Their entries of `manifest["edits"]`.
    """
    return [edit for edit in manifest.get("edits", []) if edit.get("layer")]
