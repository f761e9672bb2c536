"""Opening a bank that `m3 build-memory` wrote: its shards as one store, its index, its embedder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from m3.backends.base import MemoryIndex, MemoryStore
from m3.backends.hdf5_store import HDF5Store
from m3.core import registry
from m3.core.errors import UserError

if TYPE_CHECKING:
    from m3.retrieval.embedders import Embedder

from m3.backends.sharded import ShardedStore
from m3.bank.inputs import read_manifest
from m3.bank.layers import open_layers
from m3.bank.layout import EDIT_JOURNAL, MANIFEST, index_path

#: Times `open_bank` starts again when an edit committed while it was opening the bank.
_OPEN_ATTEMPTS = 5


class Bank(NamedTuple):
    """An opened memory bank.

    Attributes:
        store: The memories (one `HDF5Store`, a `ShardedStore` over several, or a
            `LayeredStore` with the layers of the bank's edits on top).
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
    built: MemoryStore = shards[0] if len(shards) == 1 else ShardedStore(shards)
    return open_layers(folder, manifest, built)


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
