"""Opening a bank that `m3 build-memory` wrote: its shards as one store, its index, its embedder.

**Provenance by id from the reference table.** A bank built with a reference table
(`references/`, `m3.bank.table`) opens as a `ShardedStore` given that table: every id's token
ids and provenance (`store.references`, and `store.reference_tokens`, which the retriever's
leakage filter reads) come from the table's memory-mapped arrays, the memories from the
shards; the ids an edit wrote come from its layer (`m3.bank.layers`). The table is used only
when it is the one the bank was built from: its knowledge fingerprint is the manifest's
`built_from.knowledge` and it holds exactly the ids the shards do.

**A bank built before the table** (no `references/`) opens as it always did: its shards'
own copies of the token ids serve `store.references` (and the retriever, which falls back
to them), so it retrieves the same ids and filters the same. Nothing needs to be rebuilt;
a build that resumes it, or rebuilds it (`m3 build-memory --overwrite`), writes its table.
A table that does not match (or is damaged) is left unused, with a warning naming it; so
is the table of a bank whose shards an earlier m3 edited in place.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from m3.backends.base import MemoryIndex, MemoryStore
from m3.backends.hdf5_store import HDF5Store
from m3.core import registry
from m3.core.errors import UserError

if TYPE_CHECKING:
    from m3.retrieval.embedders import Embedder

from m3.backends.sharded import ShardedStore
from m3.bank.inputs import read_manifest
from m3.bank.layers import open_layers
from m3.bank.layout import EDIT_JOURNAL, MANIFEST, TABLE, index_path
from m3.bank.table import TABLE_MANIFEST, ReferenceTable

#: Times `open_bank` starts again when an edit committed while it was opening the bank.
_OPEN_ATTEMPTS = 5


class Bank(NamedTuple):
    """An opened memory bank.

    Attributes:
        store: The memories (one `HDF5Store`, a `ShardedStore` over several or over one
            with the bank's reference table, or a `LayeredStore` with the layers of the
            bank's edits on top).
        index: The search index over every reference's embedding.
        embedder: The embedder that built the index (embed queries with it).
        manifest: The bank's `manifest.json`.
    """

    store: MemoryStore
    index: MemoryIndex
    embedder: Embedder
    manifest: dict[str, Any]


def open_bank_store(folder: str | Path) -> tuple[MemoryStore, dict[str, Any]]:
    """Open only the store of a bank that `build_memory` wrote, with its manifest.

    Its shards (and its edits' layers) open read-only as one store; neither the index nor
    the embedder is loaded (continual training in `training.encode: store` reads memories
    by id, searching nothing).

    Args:
        folder: The bank folder.

    Returns:
        The store and the bank's `manifest.json`.

    Raises:
        UserError: For a folder without a finished bank, an incomplete shard, or a shard
            whose quantizer is not the manifest's.
    """
    folder = Path(folder)
    if (folder / EDIT_JOURNAL).is_dir():
        raise UserError(
            f"{folder} holds no finished memory bank: an edit was interrupted; finish it with "
            f"m3 edit {folder} --resume"
        )
    if not (folder / MANIFEST).is_file() or not (folder / "done.json").is_file():
        raise UserError(f"{folder} holds no finished memory bank (run m3 build-memory)")
    manifest = read_manifest(folder)
    return _open_store(folder, manifest), manifest  # edits never delete a listed file


def _open_store(folder: Path, manifest: dict[str, Any]) -> MemoryStore:
    """The store that `manifest` describes: shards as one, edits' layers on top."""
    shards = [HDF5Store(folder / shard["file"]) for shard in manifest["shards"]]
    recorded = (manifest.get("quantizer") or {}).get("fingerprint")
    for shard in shards:
        if (shard.info.quantizer or {}).get("fingerprint") != recorded:
            raise UserError(
                f"{shard.path}: its quantizer is not the one in {folder / MANIFEST} "
                f"({str(recorded)[:16]}): rebuild the bank"
            )
    table = bank_table(folder, manifest, [shard.ids() for shard in shards])
    one = len(shards) == 1 and table is None
    built: MemoryStore = shards[0] if one else ShardedStore(shards, table=table)
    return open_layers(folder, manifest, built)


def bank_table(
    folder: str | Path, manifest: dict[str, Any], ids: list[Any] | None = None
) -> ReferenceTable | None:
    """The bank's reference table, when it is the one its shards were built from.

    Args:
        folder: The bank folder.
        manifest: Its manifest.
        ids: The ids of each built shard (`HDF5Store.ids()`), to check that the table
            holds exactly them; None checks the manifest's counts only.

    Returns:
        The table; None for a bank without one (built before the table existed) or whose
        shards an earlier m3 edited in place, or with one that is damaged or of other
        references (then with a warning).
    """
    path = Path(folder) / TABLE
    if not (path / TABLE_MANIFEST).is_file():
        return None
    if any(not edit.get("layer") for edit in manifest.get("edits", [])):
        return None  # an earlier m3 edited the shards in place: the table is not theirs
    try:
        table = ReferenceTable(path)
    except UserError as error:
        warnings.warn(f"{error}: reading the references from the bank's shards", stacklevel=2)
        return None
    built = (manifest.get("built_from") or {}).get("knowledge")
    count = sum(int(shard.get("references", -1)) for shard in manifest["shards"])
    held = True
    if ids is not None:  # the ids of a shard are distinct, and no two shards hold one id
        arrays = [np.asarray(i, dtype=np.int64) for i in ids]
        held = sum(a.size for a in arrays) == len(table) and all(
            a.size == 0 or (int(a.min()) >= 0 and int(a.max()) < len(table)) for a in arrays
        )
    if table.knowledge != built or count != len(table) or not held:
        warnings.warn(
            f"{path} is not the reference table {Path(folder) / MANIFEST} was built from "
            f"(knowledge {table.knowledge[:12]}, {len(table)} references; the bank: "
            f"{str(built)[:12]}, {count}): reading the references from the bank's shards",
            stacklevel=2,
        )
        return None
    return table


def open_bank(folder: str | Path) -> Bank:
    """Open a bank that `build_memory` wrote: its shards as one store, its index and embedder.

    Args:
        folder: The bank folder.

    Returns:
        The bank.

    A quantized bank's shards reopen with the quantizer each holds (checked against the
    manifest's); reads decode to the manifest's `dtype`.

    Raises:
        UserError: For a folder without a finished bank, an incomplete shard, or a shard
            whose quantizer is not the manifest's.
    """
    folder = Path(folder)
    for attempt in range(_OPEN_ATTEMPTS):
        store, manifest = open_bank_store(folder)
        try:
            index = registry.class_of(manifest["index"]["class"], "index").load(
                folder / index_path(manifest)
            )
            break
        except (UserError, OSError):
            store.close()
            if attempt + 1 == _OPEN_ATTEMPTS or read_manifest(folder) == manifest:
                raise  # an edit that committed meanwhile deletes the index it replaced
    embedder_class = registry.class_of(manifest["embedder"]["class"], "embedder")
    if (folder / "embedder").is_dir() and hasattr(embedder_class, "load"):
        embedder = embedder_class.load(folder / "embedder")
    else:
        embedder = registry.instantiate("embedder", manifest["embedder"]["spec"])
    if not embedder.matches(manifest["embedder"]["fingerprint"]):
        raise UserError(f"{folder}: the saved embedder differs from the one that built the index")
    return Bank(store, index, embedder, manifest)
