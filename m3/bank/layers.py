"""Edits as layers: how `m3 edit` changes a bank while other processes read it.

An edit never changes a file that a reader may have open. Edit `n` writes

- `edits/edit-000n.h5`: the memories and provenance of the references it wrote (an empty
  store when it only deletes), a small `HDF5Store` of its own;
- `index-000n/`: the index after the edit (the previous one, less the removed ids, plus
  the new embeddings), saved whole and synced;

and then commits by replacing `manifest.json` atomically (`os.replace`). The manifest's
`edits[n-1]` entry names the layer and the ids the edit wrote and removed; `index.path`
names the index. `open_bank` reads the built shards and the layers as one `LayeredStore`:
the newest layer holding an id serves it, and ids an edit removed are hidden below it. So

- a reader that opened the bank before the commit keeps reading the bank it opened: none
  of its files change, and its index is in its memory;
- a reader that opens during an edit sees the bank before it, and after the commit the
  bank after it, never a mix;
- an edit stopped at any moment before the commit leaves the bank as it was: what it wrote
  is listed nowhere, and the next edit deletes it (`collect_garbage`), as it deletes the
  index that the commit replaced.

Edits run one at a time: each holds the bank's edit lock (`edit_lock`) from before it reads
the manifest until after its commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from m3.backends.base import MemoryIndex, MemoryStore, MissingReferenceError, StoreInfo
from m3.backends.hdf5_salvage import marker_path
from m3.backends.hdf5_store import HDF5Store
from m3.backends.sharded import LayeredStore
from m3.bank.layout import EDIT_LAYERS, EDIT_LOCK, MANIFEST, index_path, layered_edits
from m3.core import registry
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.retrieval.embedders import Embedder


@contextlib.contextmanager
def edit_lock(folder: Path) -> Iterator[None]:
    """Hold the bank's edit lock (`edit.lock`, an advisory `flock`) for one edit.

    Taken before an edit reads the manifest, so that two edits never build on the same
    one; released when the process ends, however it ends.

    Args:
        folder: The bank folder.

    Raises:
        UserError: When another process is editing the bank (nothing is changed then).
    """
    path = folder / EDIT_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(
                f"{folder} is being edited by another process (pid {holder}): wait for that "
                "edit to finish, then run yours again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def layer_names(number: int) -> tuple[str, str]:
    """The files edit `number` writes, relative to the bank folder.

    Args:
        number: The edit's number (1 for a bank's first edit).

    Returns:
        `(layer, index)`: e.g. `("edits/edit-0001.h5", "index-0001")`.
    """
    return f"{EDIT_LAYERS}/edit-{number:04d}.h5", f"index-{number:04d}"


def open_layers(folder: Path, manifest: dict[str, Any], built: MemoryStore) -> MemoryStore:
    """The bank as its edits left it: the built store with every edit's layer on top.

    Args:
        folder: The bank folder.
        manifest: Its manifest.
        built: The built shards, as one store.

    Returns:
        `built` itself for a bank without layers, else a `LayeredStore`.

    Raises:
        UserError: For a layer that is missing, incomplete or of other memories.
    """
    edits = layered_edits(manifest)
    if not edits:
        return built
    layers: list[MemoryStore] = [built]
    try:
        for edit in edits:
            layers.append(HDF5Store(folder / edit["layer"]))
        return LayeredStore(layers, [[], *(edit["removed"] for edit in edits)])
    except BaseException:
        for layer in layers[1:]:
            layer.close()
        raise


def edited_ids(ids: np.ndarray, edits: Sequence[dict[str, Any]]) -> np.ndarray:
    """The ids a bank serves after edits: each removes its `removed`, then adds its `written`.

    Args:
        ids: The ids before the edits, `(N,)` int64.
        edits: Manifest entries of the edits, oldest first.

    Returns:
        The ids after them, `(M,)` int64, ascending.
    """
    served = np.unique(np.asarray(ids, dtype=np.int64))
    for edit in edits:
        removed = np.asarray(edit["removed"], dtype=np.int64)
        written = np.asarray(edit["written"], dtype=np.int64)
        served = np.union1d(np.setdiff1d(served, removed), written)
    return served


def replay_edits(
    folder: Path,
    edits: Sequence[dict[str, Any]],
    index: MemoryIndex,
    tokenizer: Tokenizer,
    embedder: Embedder,
) -> None:
    """Apply edits' layers to a rebuilt index, as the edits did (a resumed build keeps them).

    Args:
        folder: The bank folder.
        edits: The manifest's layered edits, oldest first.
        index: The index of the bank as built; built again here.
        tokenizer: Decodes the layers' references to the texts the edits embedded.
        embedder: The bank's embedder, fitted as the edits' was.
    """
    for edit in edits:
        remove_from_index(index, edit["removed"])
        if edit["written"]:
            ids = torch.tensor(edit["written"], dtype=torch.long)
            with HDF5Store(folder / edit["layer"]) as layer:
                texts = [tokenizer.decode(r.ids) for r in layer.references(ids)]
            index.add(embedder.embed(texts), ids)  # replaces what it rewrote in place
    index.build()


def write_layer(
    folder: Path,
    name: str,
    info: StoreInfo,
    store: MemoryStore,
    ids: Sequence[int],
    memory: SparseMemory | None,
    references: Sequence[Reference],
) -> None:
    """Write an edit's layer: its references' memories and provenance, synced, complete.

    Args:
        folder: The bank folder.
        name: The layer's file, relative to `folder` (`layer_names`).
        info: The bank's store description.
        store: The bank's store (its quantizer, if any, codes the layer too).
        ids: The ids written, in the order of `memory`'s rows.
        memory: Their memories, `(N, L_mem, H_kv, k, d_h)`; None when nothing is written.
        references: Their token ids and provenance.
    """
    path = folder / name
    path.parent.mkdir(exist_ok=True)
    quantizer = getattr(store, "quantizer", None)
    with HDF5Store(path, info=info, mode="w", quantizer=quantizer) as layer:
        if ids and memory is not None:
            layer.write(torch.tensor(list(ids), dtype=torch.long), memory, list(references))
        layer.mark_complete()


def save_index(folder: Path, name: str, index: MemoryIndex) -> None:
    """Save an edit's index under `name` and sync its files, so that the commit may name it.

    Args:
        folder: The bank folder.
        name: The index folder, relative to `folder` (`layer_names`).
        index: The index after the edit.
    """
    path = folder / name
    if path.exists():
        shutil.rmtree(path)
    index.save(path)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        _sync(file)
    _sync(path)


def remove_from_index(index: MemoryIndex, ids: Sequence[int]) -> None:
    """Remove ids from an index, skipping those already gone (a resumed edit).

    Args:
        index: The bank's index.
        ids: The reference ids to remove.
    """
    if not ids:
        return
    try:
        index.remove(torch.tensor(list(ids), dtype=torch.long))
    except MissingReferenceError:
        for reference_id in ids:
            with contextlib.suppress(MissingReferenceError):
                index.remove(torch.tensor([reference_id], dtype=torch.long))


def commit(folder: Path, manifest: dict[str, Any]) -> None:
    """Replace the bank's manifest atomically: the commit point of an edit.

    Args:
        folder: The bank folder.
        manifest: The manifest after the edit (its files written and synced).
    """
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    _sync(tmp)
    os.replace(tmp, folder / MANIFEST)
    _sync(folder)


def collect_garbage(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Delete what no manifest names: an interrupted edit's files, replaced indexes.

    Called with the edit lock held. A reader that opened the bank before the manifest it
    names these in was replaced holds its index in memory and reads no file deleted here;
    replaced indexes go through their class's `MemoryIndex.discard` (a `MilvusIndex` keeps
    a retired collection searchable a while for such readers).

    Args:
        folder: The bank folder.
        manifest: Its manifest as committed.

    Returns:
        The names deleted, relative to `folder`.
    """
    listed = {folder / edit["layer"] for edit in layered_edits(manifest)}
    listed |= {marker_path(path) for path in listed}
    keep_index = folder / index_path(manifest)
    indexes = [p for p in [folder / "index", *sorted(folder.glob("index-*"))] if p != keep_index]
    gone = [p for p in sorted((folder / EDIT_LAYERS).glob("*")) if p not in listed]
    gone += [folder / (MANIFEST + ".tmp")]
    deleted = []
    index_class = registry.class_of(manifest["index"]["class"], "index")
    for path in indexes:  # through the index class: one may keep its vectors elsewhere
        if path.exists():
            index_class.discard(path)
            deleted.append(path.name)
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        deleted.append(str(path.relative_to(folder)))
    return deleted


def _sync(path: Path) -> None:
    """Sync a file or folder to disk, so that a rename after it never names unwritten bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
