"""Exact nearest-neighbour search: an fp32 matrix product and a top-k, batched over queries.

`ExactIndex` is the reference every approximate index is measured against (recall@k), and a
fine index in its own right up to ~100k references (MEASURED.md: ~100 queries/s at 1M × 384
on 2 CPU cores, ~100× slower than ScaNN). Scores are computed in fp32 whatever the input
dtype: bf16 scoring alone drops exact recall@5 to ~0.85.

```python
index = ExactIndex(384, metric="cosine")
index.add(embeddings, ids)          # (N, 384), (N,) int64
scores, ids = index.search(queries, k=5)
index.save("bank/index"); ExactIndex.load("bank/index")
```

Its rows of ids and vectors are `m3.backends.slots.VectorRows`; its input checks are
`m3.backends.checks`, shared with `m3.backends.scann_index`.

A saved index loads memory-mapped (copy on write: changes stay in the process, the files
never change), so that opening a bank costs no time and processes on one machine share the
pages. `add_parts` streams vectors given part by part (a bank's embedding shards) into the
saved form without holding them in memory twice; `save` replaces each file by one rename,
so that a process that mapped the previous files keeps reading them whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryIndex, SearchResult
from m3.backends.checks import (
    MANIFEST,
    as_index_ids,
    as_vectors,
    check_dim,
    check_k,
    check_metric,
    empty_result,
    read_manifest,
)
from m3.backends.slots import VectorRows
from m3.core.checks import check_int
from m3.core.errors import UserError


def write_vectors(
    path: str | Path,
    parts: Iterable[tuple[Tensor | np.ndarray, Tensor | np.ndarray]],
    count: int,
    *,
    dim: int,
    metric: str,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Stream vectors given part by part into one `.npy` file, in the form an index scores.

    Each part is checked and normalised (`as_vectors`) as it comes and written to a
    memory-mapped file, so no more than one part is held in memory; the file appears by
    one rename once whole.

    Args:
        path: The `.npy` file to write.
        parts: `(vectors, ids)`: `(n, dim)` float vectors and their `(n,)` int64 ids.
        count: The number of vectors in all parts.
        dim: Their dimension.
        metric: "cosine" (rows L2-normalised) or "dot".
        where: Name of the index, for messages.

    Returns:
        The vectors `(count, dim)` float32, memory-mapped read-only from `path`, and the ids
        `(count,)` int64 in the same order.

    Raises:
        UserError: For a part of another dimension, bad values or ids, repeated ids, or
            parts holding another number of vectors than `count`.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
    ids = np.zeros(count, dtype=np.int64)
    filled = 0
    try:
        for vectors, part_ids in parts:
            x = as_vectors(vectors, dim, metric=metric, name="embeddings", where=where)
            rows = as_index_ids(part_ids, x.shape[0], where=where)
            if filled + len(rows) > count:
                raise UserError(f"{where}: the parts hold more than {count} vectors")
            out[filled : filled + len(rows)] = x
            ids[filled : filled + len(rows)] = rows
            filled += len(rows)
        if filled != count:
            raise UserError(f"{where}: the parts hold {filled} vectors, expected {count}")
        if len(np.unique(ids)) != count:
            raise UserError(f"{where}: the parts give some id twice")
        out.flush()
    except BaseException:
        del out
        tmp.unlink(missing_ok=True)
        raise
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r"), ids


def _save_array(path: Path, array: np.ndarray) -> None:
    """`np.save`, made visible by one rename (a reader mapping the old file keeps it whole)."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class ExactIndex(MemoryIndex):
    """Exact search: fp32 `queries @ vectors.T` and `topk`, over blocks of queries.

    Vectors live in one `(N, dim)` float32 tensor (L2-normalised when the metric is
    "cosine"); re-adding an id overwrites its row and removing one moves the last row into its
    place. Scores of each block of queries take at most `block_bytes` of memory, so a batch of
    1024 queries against 1M vectors never allocates the full `(1024, 1M)` score matrix.

    Args:
        dim: Dimension of the embeddings.
        metric: "cosine" (normalise vectors and queries; scores in [−1, 1]) or "dot"
            (inner product of the vectors as given).
        block_bytes: Memory budget of one block of scores, `(Q_block, N)` float32.
    """

    def __init__(self, dim: int, *, metric: str = "cosine", block_bytes: int = 256 * 2**20):
        self.dim = check_dim(dim, where="ExactIndex")
        self.metric = check_metric(metric, where="ExactIndex")
        self.block_bytes = check_int("ExactIndex", "block_bytes", block_bytes, low=1)
        self._rows = VectorRows(dim)

    def __repr__(self) -> str:
        return f"ExactIndex(dim={self.dim}, metric={self.metric!r}, size={len(self)})"

    def __len__(self) -> int:
        return self._rows.n

    def ids(self) -> Tensor:  # noqa: D102 (MemoryIndex.ids)
        return torch.from_numpy(np.sort(self._rows.stored()))

    def add(self, embeddings: Tensor, ids: Tensor) -> None:
        """Add vectors; re-adding an id replaces its vector.

        Args:
            embeddings: `(N, dim)` float vectors.
            ids: `(N,)` distinct int64 reference ids ≥ 0.
        """
        vectors = as_vectors(
            embeddings, self.dim, metric=self.metric, name="embeddings", where="ExactIndex.add"
        )
        ids_np = as_index_ids(ids, vectors.shape[0], where="ExactIndex.add")
        self._rows.upsert(torch.from_numpy(vectors), ids_np)

    def remove(self, ids: Tensor) -> None:
        """Remove vectors by id.

        Args:
            ids: `(N,)` int64 reference ids, each stored.

        Raises:
            MissingReferenceError: For an id that is not in the index.
        """
        where = "ExactIndex.remove"
        self._rows.remove(as_index_ids(ids, -1, where=where), where=where)

    def search(self, queries: Tensor, k: int) -> SearchResult:
        """The `k` most similar stored vectors of each query, exactly.

        Args:
            queries: `(Q, dim)` float vectors.
            k: Neighbours per query; beyond the index size the extra slots hold id −1 and
                score −inf.

        Returns:
            `(Q, k)` float32 scores (best first) and int64 ids.
        """
        k = check_k(k, where="ExactIndex.search")
        q = torch.from_numpy(
            as_vectors(
                queries, self.dim, metric=self.metric, name="queries", where="ExactIndex.search"
            )
        )
        result = empty_result(q.shape[0], k)
        n = len(self)
        if n == 0 or q.shape[0] == 0:
            return result
        vectors, row_ids = self._rows.vectors(), torch.from_numpy(self._rows.stored())
        hits = min(k, n)
        block = max(1, self.block_bytes // (4 * n))
        for start in range(0, q.shape[0], block):
            scores = q[start : start + block] @ vectors.T  # (Q_block, N) fp32
            top = torch.topk(scores, hits, dim=1)
            result.scores[start : start + block, :hits] = top.values
            result.ids[start : start + block, :hits] = row_ids[top.indices]
        return result

    def add_parts(
        self,
        parts: Iterable[tuple[Tensor | np.ndarray, Tensor | np.ndarray]],
        count: int,
        directory: str | Path,
    ) -> None:
        """Fill an empty index with vectors given part by part, saved to `directory` at once.

        The parts stream into `directory`'s `vectors.npy` (`write_vectors`), which the index
        then maps, as `load` does: the vectors are never held twice, and the index is saved
        there (`save` again after changing it).

        Args:
            parts: `(vectors, ids)`: `(n, dim)` float vectors and their `(n,)` int64 ids,
                e.g. a bank's embedding shards, memory-mapped.
            count: The number of vectors in all parts.
            directory: Where to save the index (created if needed).

        Raises:
            UserError: For an index that holds vectors already, or parts that
                `write_vectors` refuses.
        """
        if len(self):
            raise UserError("ExactIndex.add_parts: the index holds vectors already")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        vectors, ids = write_vectors(path / "vectors.npy", parts, count, dim=self.dim,
                                     metric=self.metric, where="ExactIndex.add_parts")  # fmt: skip
        del vectors
        _save_array(path / "ids.npy", ids)
        self._save_manifest(path, count)
        self._rows = ExactIndex.load(path)._rows

    def save(self, directory: str | Path) -> None:
        """Write `vectors.npy` `(N, dim)` float32, `ids.npy` `(N,)` int64 and `index.json`.

        Each file is replaced by one rename, so a process that mapped the previous ones
        keeps reading them whole.

        Args:
            directory: Where to write (created if needed).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        vectors, ids = self._rows.trimmed()
        _save_array(path / "vectors.npy", vectors.numpy())
        _save_array(path / "ids.npy", ids)
        self._save_manifest(path, len(self))

    def _save_manifest(self, path: Path, size: int) -> None:
        manifest = {"class": "ExactIndex", "dim": self.dim, "metric": self.metric,
                    "block_bytes": self.block_bytes, "size": size}  # fmt: skip
        tmp = path / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, path / MANIFEST)

    @classmethod
    def load(cls, directory: str | Path) -> ExactIndex:
        """Read an index that `save` wrote, its vectors memory-mapped (copy on write).

        Args:
            directory: Where it was written.

        Returns:
            The index; changing it changes this process's copy only, never the files.
        """
        path = Path(directory)
        data = read_manifest(path, cls)
        index = cls(data["dim"], metric=data["metric"], block_bytes=data["block_bytes"])
        vectors = torch.from_numpy(np.load(path / "vectors.npy", mmap_mode="c"))
        ids = np.load(path / "ids.npy")
        if vectors.shape != (ids.size, index.dim):
            raise UserError(
                f"{directory}: vectors.npy has shape {tuple(vectors.shape)}, expected "
                f"({ids.size}, {index.dim}) from ids.npy and {MANIFEST}"
            )
        index._rows = VectorRows(index.dim, vectors, ids)
        return index

    def __getstate__(self) -> dict[str, Any]:
        # Pickle only the used rows, not the spare capacity or the id → row dict.
        vectors, ids = self._rows.trimmed()
        return {"dim": self.dim, "metric": self.metric, "block_bytes": self.block_bytes,
                "vectors": vectors, "ids": ids}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dim, self.metric, self.block_bytes = (
            state["dim"],
            state["metric"],
            state["block_bytes"],
        )
        self._rows = VectorRows(self.dim, state["vectors"], state["ids"])
