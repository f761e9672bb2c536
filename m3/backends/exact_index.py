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

This module also holds the id ↔ row bookkeeping that `m3.backends.scann_index` shares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryIndex, MissingReferenceError, SearchResult
from m3.core.errors import UserError

#: Similarity metrics every shipped index supports.
METRICS = ("cosine", "dot")

#: File that describes a saved index (its class, metric, dimension and parameters).
MANIFEST = "index.json"


def check_metric(metric: str, *, where: str) -> str:
    """Validate a metric name.

    Args:
        metric: "cosine" (vectors and queries are L2-normalised) or "dot".
        where: Name of the index for the message.

    Returns:
        The metric.

    Raises:
        UserError: For any other name, listing the allowed ones.
    """
    if metric not in METRICS:
        raise UserError(f"{where}: metric must be one of {list(METRICS)}, got {metric!r}")
    return metric


def check_dim(dim: int, *, where: str) -> int:
    """Validate an embedding dimension (a positive int).

    Args:
        dim: The dimension.
        where: Name of the index for the message.

    Returns:
        The dimension as an int.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise UserError(f"{where}: dim must be a positive int, got {dim!r}")
    return dim


def as_vectors(
    vectors: Tensor | np.ndarray, dim: int, *, metric: str, name: str, where: str
) -> np.ndarray:
    """Check a batch of vectors and bring it into the form an index scores.

    The work is done in numpy, single-threaded: a multi-threaded torch op right before a
    ScaNN search leaves torch's OpenMP threads spinning on the cores ScaNN needs (measured:
    −35% queries/s on 2 cores).

    Args:
        vectors: `(N, dim)` floating-point vectors (any float dtype, any device).
        dim: The index's dimension.
        metric: "cosine" L2-normalises each row (a zero row stays zero); "dot" keeps them.
        name: Argument name for messages ("embeddings", "queries").
        where: Name of the index for messages.

    Returns:
        `(N, dim)` float32, C-contiguous (it may share memory with a float32 CPU input
        when the metric is "dot"; indexes copy what they keep).

    Raises:
        UserError: For a wrong rank or dimension, a non-float dtype or non-finite values.
    """
    if isinstance(vectors, Tensor):
        shape, floating, dtype = tuple(vectors.shape), vectors.is_floating_point(), vectors.dtype
    else:
        vectors = np.asarray(vectors)
        shape, dtype = vectors.shape, vectors.dtype
        floating = np.issubdtype(dtype, np.floating)
    if len(shape) != 2:
        raise UserError(f"{where}: {name} must be 2-D (N, {dim}), got shape {shape}")
    if shape[1] != dim:
        raise UserError(
            f"{where}: {name} have dimension {shape[1]}, the index holds dimension {dim}"
        )
    if not floating:
        raise UserError(f"{where}: {name} must be floating point, got {dtype}")
    if isinstance(vectors, Tensor):
        vectors = vectors.detach()
        if vectors.dtype != torch.float32:  # numpy has no bfloat16
            vectors = vectors.to(torch.float32)
        vectors = vectors.cpu().numpy()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{where}: {name} contain NaN or infinite values")
    if metric == "cosine":
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        x = x / np.maximum(norms, np.float32(1e-12))
    return x


def as_ids(ids: Tensor | np.ndarray | Sequence[int], count: int, *, where: str) -> np.ndarray:
    """Check a batch of reference ids.

    Args:
        ids: `(N,)` integer ids, each ≥ 0 (−1 means "no hit" in results) and distinct.
        count: The expected N (the number of vectors that come with them), or −1 for any.
        where: Name of the index for messages.

    Returns:
        `(N,)` int64 numpy array.

    Raises:
        UserError: For a wrong shape, a non-integer dtype, negative or repeated ids.
    """
    t = torch.as_tensor(ids)
    if t.ndim != 1:
        raise UserError(f"{where}: ids must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise UserError(f"{where}: ids must be integers, got {t.dtype}")
    if count >= 0 and t.numel() != count:
        raise UserError(f"{where}: got {t.numel()} ids for {count} embeddings")
    out = t.detach().cpu().to(torch.int64).numpy()
    if out.size and int(out.min()) < 0:
        raise UserError(f"{where}: ids must be ≥ 0 (−1 means no hit), got {int(out.min())}")
    if np.unique(out).size != out.size:
        raise UserError(f"{where}: ids must be distinct within one call")
    return out


def check_k(k: int, *, where: str) -> int:
    """Validate the number of neighbours asked for (a positive int).

    Args:
        k: Neighbours per query.
        where: Name of the index for the message.

    Returns:
        k as an int.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"{where}: k must be a positive int, got {k!r}")
    return k


def empty_result(queries: int, k: int) -> SearchResult:
    """A result with no hits: ids −1 and scores −inf.

    Args:
        queries: Number of queries Q.
        k: Neighbours per query.

    Returns:
        `(Q, k)` scores and ids.
    """
    return SearchResult(
        torch.full((queries, k), -math.inf, dtype=torch.float32),
        torch.full((queries, k), -1, dtype=torch.int64),
    )


def read_manifest(directory: str | Path, cls: type) -> dict[str, Any]:
    """Read the manifest of a saved index and check it was written by `cls`.

    Args:
        directory: The index directory.
        cls: The class that is loading it.

    Returns:
        The manifest's contents.

    Raises:
        UserError: When the directory or manifest is missing or names another class.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{directory}: no {MANIFEST}; is this a directory that {cls.__name__}.save wrote?"
        )
    data = json.loads(path.read_text())
    if data.get("class") != cls.__name__:
        raise UserError(
            f"{directory} holds a {data.get('class')!r} index; load it with that class, "
            f"not {cls.__name__}"
        )
    return data


class _Rows:
    """Which reference id sits in which row of a dense table of N rows.

    Deleting row r moves the last row into r (swap with last), as ScaNN's own delete does,
    so that both stay dense and agree row for row.
    """

    def __init__(self, ids: np.ndarray | None = None) -> None:
        self.ids = np.zeros(0, dtype=np.int64) if ids is None else ids.astype(np.int64)
        self.n = int(self.ids.size)
        self._row = {int(i): r for r, i in enumerate(self.ids[: self.n].tolist())}

    def stored(self) -> np.ndarray:
        return self.ids[: self.n]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids`, −1 for the ones not stored."""
        get = self._row.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=ids.size)

    def append(self, ids: np.ndarray) -> np.ndarray:
        """Give new ids the next rows; returns them."""
        need = self.n + ids.size
        if need > self.ids.size:  # grow geometrically: many small adds stay linear in total
            grown = np.zeros(max(need, 2 * self.ids.size), dtype=np.int64)
            grown[: self.n] = self.ids[: self.n]
            self.ids = grown
        rows = np.arange(self.n, need, dtype=np.int64)
        self.ids[self.n : need] = ids
        self._row.update(zip(ids.tolist(), rows.tolist(), strict=True))
        self.n = need
        return rows

    def delete(self, ids: np.ndarray, *, where: str) -> list[tuple[int, int]]:
        """Delete ids one after another; returns the moves `(row, last)`: last moved into row."""
        missing = [i for i in ids.tolist() if i not in self._row]
        if missing:
            raise MissingReferenceError(f"{where}: ids not in the index: {missing[:10]}")
        moves = []
        for reference_id in ids.tolist():
            row = self._row.pop(reference_id)
            last = self.n - 1
            if row != last:
                moved = int(self.ids[last])
                self.ids[row] = moved
                self._row[moved] = row
            self.n = last
            moves.append((row, last))
        return moves


class _VectorRows(_Rows):
    """`_Rows` plus the `(N, dim)` float32 vectors themselves, in the same rows."""

    def __init__(self, dim: int, vectors: Tensor | None = None, ids: np.ndarray | None = None):
        super().__init__(ids)
        self.data = torch.zeros(0, dim) if vectors is None else vectors.contiguous()

    def vectors(self) -> Tensor:
        return self.data[: self.n]

    def upsert(self, vectors: Tensor, ids: np.ndarray) -> None:
        rows = self.rows_of(ids)
        old = rows >= 0
        if old.any():
            self.data[torch.from_numpy(rows[old])] = vectors[torch.from_numpy(old)]
        new = ~old
        if new.any():
            start = self.n
            self.append(ids[new])
            if self.n > self.data.shape[0]:
                grown = torch.zeros(max(self.n, 2 * self.data.shape[0]), self.data.shape[1])
                grown[:start] = self.data[:start]
                self.data = grown
            self.data[start : self.n] = vectors[torch.from_numpy(new)]

    def remove(self, ids: np.ndarray, *, where: str) -> None:
        moves = self.delete(ids, where=where)
        source = np.arange(self.n + len(moves))
        for row, last in moves:
            source[row] = source[last]
        source = source[: self.n]
        changed = np.nonzero(source != np.arange(self.n))[0]
        if (
            changed.size
        ):  # gather first, then scatter: every source is read before it is overwritten
            self.data[torch.from_numpy(changed)] = self.data[torch.from_numpy(source[changed])]

    def trimmed(self) -> tuple[Tensor, np.ndarray]:
        return self.vectors().clone(), self.stored().copy()


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
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
            raise UserError(f"ExactIndex: block_bytes must be a positive int, got {block_bytes!r}")
        self.block_bytes = block_bytes
        self._rows = _VectorRows(dim)

    def __repr__(self) -> str:
        return f"ExactIndex(dim={self.dim}, metric={self.metric!r}, size={len(self)})"

    def __len__(self) -> int:
        return self._rows.n

    def add(self, embeddings: Tensor, ids: Tensor) -> None:
        """Add vectors; re-adding an id replaces its vector.

        Args:
            embeddings: `(N, dim)` float vectors.
            ids: `(N,)` distinct int64 reference ids ≥ 0.
        """
        vectors = as_vectors(
            embeddings, self.dim, metric=self.metric, name="embeddings", where="ExactIndex.add"
        )
        ids_np = as_ids(ids, vectors.shape[0], where="ExactIndex.add")
        self._rows.upsert(torch.from_numpy(vectors), ids_np)

    def remove(self, ids: Tensor) -> None:
        """Remove vectors by id.

        Args:
            ids: `(N,)` int64 reference ids, each stored.

        Raises:
            MissingReferenceError: For an id that is not in the index.
        """
        self._rows.remove(as_ids(ids, -1, where="ExactIndex.remove"), where="ExactIndex.remove")

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

    def save(self, directory: str | Path) -> None:
        """Write `vectors.npy` `(N, dim)` float32, `ids.npy` `(N,)` int64 and `index.json`.

        Args:
            directory: Where to write (created if needed).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        vectors, ids = self._rows.trimmed()
        np.save(path / "vectors.npy", vectors.numpy())
        np.save(path / "ids.npy", ids)
        manifest = {"class": "ExactIndex", "dim": self.dim, "metric": self.metric,
                    "block_bytes": self.block_bytes, "size": len(self)}  # fmt: skip
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> ExactIndex:
        """Read an index that `save` wrote.

        Args:
            directory: Where it was written.

        Returns:
            The index.
        """
        path = Path(directory)
        data = read_manifest(path, cls)
        index = cls(data["dim"], metric=data["metric"], block_bytes=data["block_bytes"])
        vectors = torch.from_numpy(np.load(path / "vectors.npy"))
        ids = np.load(path / "ids.npy")
        if vectors.shape != (ids.size, index.dim):
            raise UserError(
                f"{directory}: vectors.npy has shape {tuple(vectors.shape)}, expected "
                f"({ids.size}, {index.dim}) from ids.npy and {MANIFEST}"
            )
        index._rows = _VectorRows(index.dim, vectors, ids)
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
        self._rows = _VectorRows(self.dim, state["vectors"], state["ids"])
