"""Approximate nearest-neighbour search with ScaNN: a k-means tree, asymmetric hashing, reordering.

ScaNN (`pip install memory3-lm[scann]`) searches in three stages, each one a parameter here:

1. **Tree**: the vectors are clustered into `num_leaves` partitions by k-means (trained on
   `training_sample_size` of them); a query scores only its `num_leaves_to_search` closest
   partitions. More leaves searched: higher recall, slower.
2. **Asymmetric hashing (AH)**: within those partitions, vectors are scored through a
   4-bit product quantisation with `dimensions_per_block` dimensions per code;
   `anisotropic_quantization_threshold` weights the quantisation error that matters for
   inner products (ScaNN's "anisotropic" loss; 0.2 is its usual value, None turns it off).
3. **Reordering**: the best `reorder_num_neighbors` candidates are rescored exactly in
   fp32. The depth decides recall (MEASURED.md, 1M × 384: reorder 100 → recall@5 0.993,
   reorder 20 → 0.81).

Below `brute_force_below` vectors (or when there are too few for AH's 16 codes per block),
the index is built as ScaNN's exact fp32 brute force instead: a tree makes no sense there.

```python
index = ScannIndex(384, metric="cosine")          # parameters scale with N at build()
index.add(embeddings, ids); index.build()
scores, ids = index.search(queries, k=5)
index.remove(old_ids); index.add(new_vectors, new_ids)   # applied at once, incrementally
index.build()                                      # optional: retrain on the current vectors
```

ScaNN's C++ code logs to the process's stderr at every build; the index sends fd 2 to a
temporary file around those calls (restored also on errors) and forwards the lines to the
`m3.backends.scann_index` logger at DEBUG level. While that happens, other threads' writes
to stderr go there too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
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
from m3.backends.exact_index import write_vectors
from m3.backends.slots import Rows, VectorRows
from m3.core.checks import check_int
from m3.core.errors import UserError

logger = logging.getLogger(__name__)

#: Fewest vectors a tree with asymmetric hashing can be trained on (AH uses 16 codes per block).
MIN_TREE_SIZE = 256

#: Subdirectory of a saved index that holds ScaNN's own serialised searcher.
SCANN_DIR = "scann"

_INSTALL_HINT = (
    "ScannIndex needs the scann package: pip install memory3-lm[scann] "
    "(scann ships wheels for Linux and macOS, CPython ≤ 3.13)"
)


def _scann() -> ModuleType:
    """Import ScaNN's pybind wrapper (no TensorFlow needed), or say how to install it."""
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as error:
        raise UserError(f"{_INSTALL_HINT}; importing it failed with: {error}") from error
    return scann_ops_pybind


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the duration, then log what it got.

    Environment variables do not silence ScaNN's C++ logging, so the descriptor itself is
    redirected. It is restored in all cases; when the body raises, the captured lines are
    attached to the exception as a note (Python ≥ 3.11) so that nothing useful is lost.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to protect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException as error:
            os.dup2(saved, 2)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text and hasattr(error, "add_note"):
                error.add_note("ScaNN's log:\n" + text[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        for line in sink.read().decode("utf-8", "replace").splitlines():
            logger.debug("%s", line)


class ScannIndex(MemoryIndex):
    """ScaNN tree + asymmetric hashing + exact reordering, keyed by int64 reference ids.

    Vectors are staged in fp32 until the first `build()`, which trains the searcher and then
    drops the staged copy (ScaNN keeps its own fp32 copy for reordering). After that, `add`
    and `remove` go straight into the built searcher through ScaNN's incremental
    upsert/delete (new vectors are assigned to the trained partitions and codes, nothing is
    retrained), so results reflect them at once. Calling `build()` again retrains from
    scratch on the current vectors, with the parameters derived anew for the current size:
    do it after the collection has changed a lot (e.g. grown severalfold).

    Parameters left as None are derived at build time from the number of vectors N:
    `num_leaves = round(sqrt(N))`, `num_leaves_to_search = ceil(num_leaves / 20)` (≥ 1).
    `build_params` says what the last build used.

    Args:
        dim: Dimension of the embeddings.
        metric: "cosine" (vectors and queries L2-normalised, searched by inner product) or
            "dot" (inner product of the vectors as given).
        num_leaves: Partitions of the k-means tree; more leaves make each one smaller.
        num_leaves_to_search: Partitions scored per query; the main speed/recall knob.
        training_sample_size: Vectors sampled to train the tree and the hashing codes.
        spherical: Spherical k-means (unit-norm centres) for the tree; None: True for
            "cosine", where it makes a vector's partition agree with the partitions its own
            query searches (plain k-means missed ~1% of vectors added after training).
        dimensions_per_block: Dimensions per AH code block (2 is ScaNN's usual for inner
            products; larger: coarser and faster).
        anisotropic_quantization_threshold: ScaNN's anisotropic AH loss threshold, or None
            to quantise by plain squared error.
        reorder_num_neighbors: Candidates rescored exactly in fp32 per query (raised to k
            when a search asks for more).
        brute_force_below: Below this many vectors, build ScaNN's exact brute force instead
            of a tree.
        training_threads: Threads for training (0: ScaNN's default, all cores).
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "cosine",
        num_leaves: int | None = None,
        num_leaves_to_search: int | None = None,
        training_sample_size: int = 100_000,
        spherical: bool | None = None,
        dimensions_per_block: int = 2,
        anisotropic_quantization_threshold: float | None = 0.2,
        reorder_num_neighbors: int = 100,
        brute_force_below: int = 10_000,
        training_threads: int = 0,
    ):
        self.dim = check_dim(dim, where="ScannIndex")
        self.metric = check_metric(metric, where="ScannIndex")
        owner = "ScannIndex"
        self.num_leaves = (
            None if num_leaves is None else check_int(owner, "num_leaves", num_leaves, low=2)
        )
        self.num_leaves_to_search = (
            None
            if num_leaves_to_search is None
            else check_int(owner, "num_leaves_to_search", num_leaves_to_search, low=1)
        )
        if (
            self.num_leaves is not None
            and self.num_leaves_to_search is not None
            and self.num_leaves_to_search > self.num_leaves
        ):
            raise UserError(
                f"ScannIndex: num_leaves_to_search ({num_leaves_to_search}) must be ≤ "
                f"num_leaves ({num_leaves})"
            )
        self.training_sample_size = check_int(
            owner, "training_sample_size", training_sample_size, low=1
        )
        if spherical is not None and not isinstance(spherical, bool):
            raise UserError(f"ScannIndex: spherical must be True, False or None, got {spherical!r}")
        self.spherical = spherical
        self.dimensions_per_block = check_int(
            owner, "dimensions_per_block", dimensions_per_block, low=1
        )
        if dimensions_per_block > dim:
            raise UserError(
                f"ScannIndex: dimensions_per_block ({dimensions_per_block}) must be ≤ dim ({dim})"
            )
        if anisotropic_quantization_threshold is not None and not (
            isinstance(anisotropic_quantization_threshold, (int, float))
            and math.isfinite(anisotropic_quantization_threshold)
        ):
            raise UserError(
                "ScannIndex: anisotropic_quantization_threshold must be a finite number or "
                f"None, got {anisotropic_quantization_threshold!r}"
            )
        self.anisotropic_quantization_threshold = anisotropic_quantization_threshold
        self.reorder_num_neighbors = check_int(
            owner, "reorder_num_neighbors", reorder_num_neighbors, low=1
        )
        self.brute_force_below = check_int(owner, "brute_force_below", brute_force_below, low=None)
        self.training_threads = check_int(owner, "training_threads", training_threads, low=0)
        _scann()  # fail at construction, not after an hour of encoding, when scann is missing
        self._staged: VectorRows | None = VectorRows(dim)  # vectors before the first build
        self._rows = Rows()  # rows of the built searcher
        self._searcher: Any = None
        self._built = False
        self._changed = False  # vectors added or removed since the last build
        self.build_params: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"ScannIndex(dim={self.dim}, metric={self.metric!r}, size={len(self)}, "
            f"built={self._built})"
        )

    def __len__(self) -> int:
        return self._staged.n if self._staged is not None else self._rows.n

    def ids(self) -> Tensor:  # noqa: D102 (MemoryIndex.ids)
        rows = self._staged if self._staged is not None else self._rows
        return torch.from_numpy(np.sort(rows.stored()))

    # --- writing -------------------------------------------------------------------------

    def add(self, embeddings: Tensor, ids: Tensor) -> None:
        """Add vectors; re-adding an id replaces its vector.

        Before the first `build()` vectors are staged; afterwards they go into the searcher
        at once through ScaNN's upsert (assigned to the trained partitions and codes).

        Args:
            embeddings: `(N, dim)` float vectors.
            ids: `(N,)` distinct int64 reference ids ≥ 0.
        """
        where = "ScannIndex.add"
        vectors = as_vectors(
            embeddings, self.dim, metric=self.metric, name="embeddings", where=where
        )
        ids_np = as_index_ids(ids, vectors.shape[0], where=where)
        if ids_np.size == 0:
            return
        self._changed = True
        if self._staged is not None:
            self._staged.upsert(torch.from_numpy(vectors), ids_np)
            self._built = False
            return
        rows = self._rows.rows_of(ids_np)
        new = rows < 0
        expected = np.arange(self._rows.n, self._rows.n + int(new.sum()))
        with native_stderr_to_log():
            got = self._searcher.searcher.upsert(
                [int(r) if r >= 0 else None for r in rows.tolist()], vectors, 256
            )
        if not np.array_equal(np.asarray(got, dtype=np.int64)[new], expected):
            raise RuntimeError("ScannIndex: ScaNN's upsert put new vectors in unexpected rows")
        self._rows.append(ids_np[new])

    def remove(self, ids: Tensor) -> None:
        """Remove vectors by id (from the built searcher at once, through ScaNN's delete).

        Args:
            ids: `(N,)` int64 reference ids, each stored.

        Raises:
            MissingReferenceError: For an id that is not in the index.
        """
        where = "ScannIndex.remove"
        ids_np = as_index_ids(ids, -1, where=where)
        if ids_np.size == 0:
            return
        if self._staged is not None:
            self._staged.remove(ids_np, where=where)
            self._changed = True
            self._built = False
            return
        moves = self._rows.delete(ids_np, where=where)
        self._changed = True
        with native_stderr_to_log():
            moved = self._searcher.searcher.delete([row for row, _ in moves])
        if list(moved) != [last for _, last in moves]:
            raise RuntimeError("ScannIndex: ScaNN's delete moved rows unexpectedly")

    # --- building ------------------------------------------------------------------------

    def build(self) -> None:
        """Train the searcher on the current vectors (a no-op when nothing changed).

        The first call trains on the staged vectors; later calls retrain from scratch on the
        searcher's current contents, deriving unset parameters anew for the current size.
        """
        if self._built and not self._changed:
            return
        if self._staged is not None:
            vectors, ids = self._staged.vectors().numpy(), self._staged.stored().copy()
        elif self._rows.n:
            vectors, ids = self._current_vectors(), self._rows.stored().copy()
        else:  # everything was removed
            vectors, ids = np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        self._searcher = self._train(vectors) if ids.size else None
        self._rows = Rows(ids)
        self._staged = None if ids.size else VectorRows(self.dim)
        self._built, self._changed = True, False

    def add_parts(
        self,
        parts: Iterable[tuple[Tensor | np.ndarray, Tensor | np.ndarray]],
        count: int,
        directory: str | Path,
    ) -> None:
        """Build an empty index from vectors given part by part, trained from a mapped file.

        The parts stream into a scratch file in `directory` (`write_vectors`); ScaNN
        trains on it memory-mapped and keeps its own copy, so the fp32 copy that `add`
        stages until `build` is never made. The scratch file is deleted; `save` after.

        Args:
            parts: `(vectors, ids)`: `(n, dim)` float vectors and their `(n,)` int64 ids,
                e.g. a bank's embedding shards, memory-mapped.
            count: The number of vectors in all parts.
            directory: A folder for the scratch file (created if needed).

        Raises:
            UserError: For an index that holds vectors already, or parts that
                `write_vectors` refuses.
        """
        if len(self) or self._built:
            raise UserError("ScannIndex.add_parts: the index holds vectors already")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        scratch = path / f"vectors-{os.getpid()}.scratch.npy"
        try:
            vectors, ids = write_vectors(scratch, parts, count, dim=self.dim, metric=self.metric,
                                         where="ScannIndex.add_parts")  # fmt: skip
            self._searcher = self._train(vectors) if ids.size else None
            del vectors
        finally:
            scratch.unlink(missing_ok=True)
        self._rows = Rows(ids)
        self._staged = None if ids.size else VectorRows(self.dim)
        self._built, self._changed = True, False

    def _params_for(self, n: int) -> dict[str, Any]:
        if n < max(self.brute_force_below, MIN_TREE_SIZE):
            return {"brute_force": True, "size": n}
        leaves = self.num_leaves or max(2, round(math.sqrt(n)))
        if leaves > n // 2:
            raise UserError(
                f"ScannIndex: num_leaves ({leaves}) is too many for {n} vectors (at most {n // 2})"
            )
        search = self.num_leaves_to_search or max(1, math.ceil(leaves / 20))
        return {
            "brute_force": False,
            "size": n,
            "num_leaves": leaves,
            "num_leaves_to_search": min(search, leaves),
            "training_sample_size": self.training_sample_size,
            "spherical": self.metric == "cosine" if self.spherical is None else self.spherical,
            "dimensions_per_block": self.dimensions_per_block,
            "anisotropic_quantization_threshold": self.anisotropic_quantization_threshold,
            "reorder_num_neighbors": self.reorder_num_neighbors,
        }

    def _train(self, vectors: np.ndarray) -> Any:
        params = self._params_for(vectors.shape[0])
        builder = _scann().builder(np.ascontiguousarray(vectors), 10, "dot_product")
        if params["brute_force"]:
            builder = builder.score_brute_force()
        else:
            threshold = params["anisotropic_quantization_threshold"]
            builder = (
                builder.tree(
                    num_leaves=params["num_leaves"],
                    num_leaves_to_search=params["num_leaves_to_search"],
                    training_sample_size=params["training_sample_size"],
                    spherical=params["spherical"],
                )
                .score_ah(
                    params["dimensions_per_block"],
                    anisotropic_quantization_threshold=math.nan if threshold is None else threshold,
                    training_sample_size=params["training_sample_size"],
                )
                .reorder(params["reorder_num_neighbors"])
            )
        builder = builder.set_n_training_threads(self.training_threads)
        with native_stderr_to_log():
            searcher = builder.build()
        self.build_params = params
        return searcher

    def _current_vectors(self) -> np.ndarray:
        # ScaNN keeps the fp32 vectors (in row order) for reordering; read them back from
        # its serialisation rather than holding a second copy in Python.
        with tempfile.TemporaryDirectory() as tmp:
            with native_stderr_to_log():
                self._searcher.serialize(tmp, True)
            path = Path(tmp) / "dataset.npy"
            if not path.is_file():
                raise RuntimeError("ScannIndex: ScaNN's serialisation holds no dataset.npy")
            vectors = np.load(path)
        if vectors.shape != (self._rows.n, self.dim):
            raise RuntimeError(
                f"ScannIndex: ScaNN holds vectors of shape {vectors.shape}, expected "
                f"{(self._rows.n, self.dim)}"
            )
        return vectors

    # --- searching -----------------------------------------------------------------------

    def search(self, queries: Tensor, k: int) -> SearchResult:
        """The approximately `k` most similar stored vectors of each query.

        Args:
            queries: `(Q, dim)` float vectors.
            k: Neighbours per query; slots without a hit (k beyond the index size, or beyond
                what the searched partitions hold) have id −1 and score −inf.

        Returns:
            `(Q, k)` float32 scores (best first) and int64 ids.

        Raises:
            UserError: When vectors were added before the first `build()`.
        """
        where = "ScannIndex.search"
        k = check_k(k, where=where)
        if not self._built:
            raise UserError(f"{where}: call build() after add() and before search()")
        q = as_vectors(queries, self.dim, metric=self.metric, name="queries", where=where)
        result = empty_result(q.shape[0], k)
        n = len(self)
        if n == 0 or q.shape[0] == 0:
            return result
        hits = min(k, n)
        if self.build_params["brute_force"]:
            rows, scores = self._searcher.search_batched_parallel(q, final_num_neighbors=hits)
        else:
            rows, scores = self._searcher.search_batched_parallel(
                q,
                final_num_neighbors=hits,
                leaves_to_search=self.build_params["num_leaves_to_search"],
                pre_reorder_num_neighbors=max(self.build_params["reorder_num_neighbors"], hits),
            )
        found = ~np.isnan(scores)  # ScaNN pads missing neighbours with NaN scores
        width = scores.shape[1]
        ids = np.where(found, self._rows.ids[rows.astype(np.int64)], -1)
        result.ids[:, :width] = torch.from_numpy(ids)
        result.scores[:, :width] = torch.from_numpy(np.where(found, scores, -np.inf))
        return result

    # --- persistence ---------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "metric": self.metric,
            "num_leaves": self.num_leaves,
            "num_leaves_to_search": self.num_leaves_to_search,
            "training_sample_size": self.training_sample_size,
            "spherical": self.spherical,
            "dimensions_per_block": self.dimensions_per_block,
            "anisotropic_quantization_threshold": self.anisotropic_quantization_threshold,
            "reorder_num_neighbors": self.reorder_num_neighbors,
            "brute_force_below": self.brute_force_below,
            "training_threads": self.training_threads,
        }

    def save(self, directory: str | Path) -> None:
        """Write `index.json`, `ids.npy` and ScaNN's serialised searcher (`scann/`).

        An index with vectors not yet built saves them as `vectors.npy` instead.

        Args:
            directory: Where to write (created if needed).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path / SCANN_DIR, ignore_errors=True)
        (path / "vectors.npy").unlink(missing_ok=True)
        if self._staged is not None:
            ids = self._staged.stored()
            np.save(path / "vectors.npy", self._staged.vectors().numpy())
        else:
            ids = self._rows.stored()
            (path / SCANN_DIR).mkdir()
            with native_stderr_to_log():
                self._searcher.serialize(str(path / SCANN_DIR), True)
        np.save(path / "ids.npy", ids)
        manifest = {
            "class": "ScannIndex",
            "config": self._config(),
            "built": self._built,
            "changed": self._changed,
            "build_params": self.build_params,
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> ScannIndex:
        """Read an index that `save` wrote.

        Args:
            directory: Where it was written.

        Returns:
            The index, searchable at once if it was built when saved.
        """
        path = Path(directory)
        manifest = read_manifest(path, cls)
        index = cls(**manifest["config"])
        ids = np.load(path / "ids.npy")
        if (path / SCANN_DIR).is_dir():
            with native_stderr_to_log():
                index._searcher = _scann().load_searcher(str(path / SCANN_DIR))
            index._rows, index._staged = Rows(ids), None
            if index._searcher.size() != ids.size:
                raise UserError(
                    f"{directory}: ScaNN holds {index._searcher.size()} vectors but ids.npy "
                    f"{ids.size}"
                )
        else:
            vectors = torch.from_numpy(np.load(path / "vectors.npy"))
            index._staged = VectorRows(index.dim, vectors, ids)
        index._built, index._changed = manifest["built"], manifest["changed"]
        index.build_params = manifest["build_params"]
        return index

    def __getstate__(self) -> dict[str, Any]:
        # The C++ searcher cannot be pickled: carry the bytes of its serialisation instead.
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            files = {
                str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()
            }
        return {"files": files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in state["files"].items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            self.__dict__.update(ScannIndex.load(tmp).__dict__)
