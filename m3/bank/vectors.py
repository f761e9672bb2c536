"""A bank's embedding shards, read: checked, listed in their manifest, made into the index.

`m3.bank.embeddings` writes the shards (`embeddings/shard-{n:05d}/`); here they are checked
(`shard_problem`: missing, unreadable, of other inputs, or, for `m3 verify`, bytes that fail
their crc32), listed once all are written (`finish_embeddings` writes `manifest.json`), read
memory-mapped (`EmbeddingShards`) and turned into the bank's index (`index_from_shards`).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from m3.core import registry
from m3.core.errors import UserError

if TYPE_CHECKING:
    from m3.backends.base import MemoryIndex
    from m3.bank.table import ReferenceTable
    from m3.retrieval.embedders import Embedder

#: The bank's folder of embedding shards.
EMBEDDINGS = "embeddings"
#: References per embedding shard (and per part of a split fit).
REFERENCES_PER_SHARD = 16384
#: The folder's manifest, written last.
EMBEDDINGS_MANIFEST = "manifest.json"
#: Vectors per block when the shards are read in order.
BLOCK_ROWS = 16384


def shard_ranges(references: int, per_shard: int | None = None) -> list[tuple[int, int]]:
    """The id ranges of the embedding shards.

    Args:
        references: References in the table.
        per_shard: References per shard; `REFERENCES_PER_SHARD` when None.

    Returns:
        `[first, end)` of each shard, in order.
    """
    per = per_shard or REFERENCES_PER_SHARD
    return [(start, min(start + per, references)) for start in range(0, references, per)]


def shard_name(n: int) -> str:
    """The folder name of embedding shard `n`.

    Args:
        n: The shard's number.
    """
    return f"shard-{n:05d}"


def shard_problem(
    folder: Path, n: int, span: tuple[int, int], stamp: dict, *, checksum: bool = False
) -> str | None:
    """Why shard `n` cannot serve, in words; None when it is sound.

    Args:
        folder: The `embeddings/` folder.
        n: The shard's number.
        span: The ids `[first, end)` it must hold.
        stamp: What it must record: the `knowledge` and `embedder` fingerprints, the `dim`.
        checksum: Also read every byte against its crc32 (`m3 verify`).

    Returns:
        A sentence naming the shard, or None.
    """
    name = f"{EMBEDDINGS}/{shard_name(n)}"
    path = folder / shard_name(n)
    if not path.is_dir():
        return f"{name} is missing"
    try:
        meta = json.loads((path / "meta.json").read_text())
        vectors = np.load(path / "vectors.npy", mmap_mode="r")
    except (OSError, ValueError) as error:
        return f"{name} is damaged ({error})"
    rows = span[1] - span[0]
    if any(meta.get(key) != value for key, value in stamp.items()):
        return f"{name} holds the vectors of another embedder or knowledge base"
    if (meta.get("first"), meta.get("rows")) != (span[0], rows) or vectors.shape != (
        rows, stamp["dim"],
    ):  # fmt: skip
        return (
            f"{name} holds {vectors.shape[0]} vectors from id {meta.get('first')}, expected "
            f"{rows} from {span[0]}"
        )
    if checksum and vectors_crc(vectors) != meta.get("crc32"):
        return f"{name} is damaged (its bytes fail their crc32)"
    return None


def vectors_crc(vectors: np.ndarray) -> int:
    """The crc32 of an array's bytes, read a block at a time.

    Args:
        vectors: The array (memory-mapped, say).
    """
    crc, step = 0, max(1, 2**24 // max(1, vectors.itemsize * int(np.prod(vectors.shape[1:]))))
    for start in range(0, len(vectors), step):
        crc = zlib.crc32(np.ascontiguousarray(vectors[start : start + step]).tobytes(), crc)
    return crc


class EmbeddingShards:
    """Every shard of a finished `embeddings/` folder, read memory-mapped.

    Args:
        folder: The `embeddings/` folder (`finish_embeddings` wrote its manifest).

    Raises:
        UserError: For a folder without a manifest, or a shard that cannot be opened.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / EMBEDDINGS_MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
            self.shards = [dict(s) for s in self.manifest["shards"]]
        except FileNotFoundError:
            raise UserError(f"{self.folder} holds no finished embedding shards") from None
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is not an embeddings manifest ({error!r})") from None

    def __len__(self) -> int:
        return int(self.manifest["references"])

    @property
    def dim(self) -> int:
        """Dimension of the vectors."""
        return int(self.manifest["dim"])

    def vectors(self, n: int) -> np.ndarray:
        """Shard `n`'s vectors, `(rows, dim)` float32, memory-mapped read-only.

        Args:
            n: The shard's position in the manifest.
        """
        try:
            return np.load(self.folder / self.shards[n]["name"] / "vectors.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            raise UserError(f"{self.folder}: shard {n} cannot be read ({error})") from None

    def parts(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every vector with its id, in id order, a block of at most `rows` at a time.

        Args:
            rows: Most vectors per block.

        Yields:
            `(vectors, ids)`: `(n, dim)` float32 (views of the mapped files) and `(n,)` int64.
        """
        for n, shard in enumerate(self.shards):
            vectors, first = self.vectors(n), int(shard["first"])
            for start in range(0, len(vectors), rows):
                block = vectors[start : start + rows]
                yield block, np.arange(first + start, first + start + len(block))

    def problems(self, *, checksums: bool = False) -> dict[int, str]:
        """Every shard that is missing, damaged or of other inputs, in words.

        Args:
            checksums: Read every byte against its crc32 (slow: all the vectors).

        Returns:
            A sentence naming each unsound shard, by its number; empty when all are sound.
        """
        stamp = {k: self.manifest[k] for k in ("knowledge", "embedder", "dim")}
        found = {}
        for n, shard in enumerate(self.shards):
            span = (int(shard["first"]), int(shard["first"]) + int(shard["rows"]))
            problem = shard_problem(self.folder, n, span, stamp, checksum=checksums)
            if problem is None and checksums:
                meta = json.loads((self.folder / shard_name(n) / "meta.json").read_text())
                if meta.get("crc32") != shard.get("crc32"):
                    problem = f"{EMBEDDINGS}/{shard_name(n)} is not the shard the manifest lists"
            if problem is not None:
                found[n] = problem
        return found


def bank_embeddings(folder: Path, manifest: dict[str, Any]) -> EmbeddingShards | str | None:
    """The embedding shards a bank's manifest names.

    Args:
        folder: The bank folder.
        manifest: Its `manifest.json`.

    Returns:
        The shards; why they cannot be opened, in words; None for a bank built before
        embedding shards existed (its manifest names none).
    """
    named = manifest.get("embeddings")
    if not named:
        return None
    try:
        return EmbeddingShards(folder / str(named.get("path", EMBEDDINGS)))
    except UserError as error:
        return f"{EMBEDDINGS}/: {error}"


def finish_embeddings(
    folder: Path, table: ReferenceTable, embedder: Embedder
) -> EmbeddingShards | None:
    """Write the manifest once every shard is written; None while some are missing.

    Args:
        folder: The bank's `embeddings/` folder.
        table: The reference table.
        embedder: The fitted embedder.

    Returns:
        The shards, or None (naming the first missing one on stdout).
    """
    stamp = {"knowledge": table.knowledge, "embedder": embedder.fingerprint(),
             "dim": embedder.dim}  # fmt: skip
    shards = []
    for n, span in enumerate(shard_ranges(len(table))):
        problem = shard_problem(folder, n, span, stamp)
        if problem is not None:
            print(f"m3 build-memory: {problem}: not written yet")
            return None
        meta = json.loads((folder / shard_name(n) / "meta.json").read_text())
        shards.append({"name": shard_name(n), "first": span[0], "rows": span[1] - span[0],
                       "crc32": meta["crc32"]})  # fmt: skip
    manifest = {"format": "m3.embeddings", "format_version": 1, "references": len(table),
                "per_shard": REFERENCES_PER_SHARD, **stamp, "shards": shards}  # fmt: skip
    tmp = folder / f"{EMBEDDINGS_MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / EMBEDDINGS_MANIFEST)
    for stale in folder.glob("shard-*"):  # of a knowledge base this one replaced
        if stale.is_dir() and int(stale.name[6:11]) >= len(shards):
            shutil.rmtree(stale, ignore_errors=True)
    return EmbeddingShards(folder)


# ------------------------------------------------------------------------------ the index
def new_index(spec: Any, embedder: Embedder) -> MemoryIndex:
    """Build the recipe's index for the embedder's vectors (empty).

    Args:
        spec: The index's component spec (`bank.index`), with `dim` left to m3.
        embedder: The fitted embedder: its `dim`, and its fingerprint for an index that
            records it (`embedder_fingerprint`, as `MilvusIndex` does on its collection).

    Returns:
        The index.
    """
    checked, _ = registry.check_spec("index", spec, path="index", provided={"dim": 1})
    extra: dict[str, Any] = {"dim": embedder.dim}
    if checked is not None:
        cls = registry.resolve("index", checked.class_path)
        if "embedder_fingerprint" in inspect.signature(cls).parameters:
            extra["embedder_fingerprint"] = embedder.fingerprint()
    return registry.instantiate("index", spec, **extra)


def index_from_shards(index: MemoryIndex, shards: EmbeddingShards, directory: Path) -> bool:
    """Fill an empty index with every shard's vectors, built.

    `ExactIndex` and `ScannIndex` stream the shards into one memory-mapped array
    (`add_parts`); any other index gets them added a block at a time, then `build()`.

    Args:
        index: An empty index of the shards' dimension.
        shards: The embedding shards.
        directory: Where the index is saved: `ExactIndex` is saved there already when this
            returns; `ScannIndex` puts a scratch file there.

    Returns:
        Whether the index is saved in `directory` already.
    """
    from m3.backends.exact_index import ExactIndex

    if hasattr(index, "add_parts"):
        index.add_parts(shards.parts(), len(shards), directory)
        return isinstance(index, ExactIndex)
    for vectors, ids in shards.parts():
        index.add(torch.from_numpy(np.array(vectors)), torch.from_numpy(ids))
    index.build()
    return False
