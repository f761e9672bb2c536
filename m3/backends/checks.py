"""What every backend checks at its door: ids, vectors, writes, manifests.

Stores and indexes, the shipped ones and a user's own (`docs/examples/my_store.py`), refuse
malformed input with the same messages, before anything is stored:

- stores: `as_reference_ids` (ids to read or delete), `check_write` (a whole write:
  counts, ids, memory shape and dtype, references), `normalise_reference` (plain Python
  values to keep), `missing_error` (the error naming ids that are not stored);
- indexes: `check_dim`, `check_metric` (`METRICS`), `check_k`, `as_vectors` (vectors in the
  form an index scores: fp32, L2-normalised for "cosine"), `as_index_ids`, `empty_result`,
  and `read_manifest` (the `index.json` that every saved index has).

```python
array = check_write(self.info, ids, memory, references, where=str(self.path))
normalised = [normalise_reference(r) for r in references]
vectors = as_vectors(embeddings, self.dim, metric=self.metric, name="embeddings",
                     where="MyIndex.add")
```
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

from m3.backends.base import MissingReferenceError, SearchResult, StoreInfo
from m3.core.checks import as_ids, check_choice, check_int
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference

#: Similarity metrics every shipped index supports.
METRICS = ("cosine", "dot")

#: File that describes a saved index (its class, metric, dimension and parameters).
MANIFEST = "index.json"


# ------------------------------------------------------------------------------------ stores
def as_reference_ids(ids: Sequence[int] | Tensor | np.ndarray, *, where: str) -> np.ndarray:
    """Turn reference ids into a 1-D int64 array, refusing anything that is not an integer.

    Args:
        ids: `(N,)` integer ids: a sequence, a tensor or an array.
        where: Name of the store, for the message.

    Returns:
        `(N,)` int64 array (a copy when the input was a tensor on another device).

    Raises:
        UserError: For non-integer or non-1-D ids.
    """
    return as_ids(ids, where=where, what="reference ids")


def check_write(
    info: StoreInfo,
    ids: Sequence[int] | Tensor,
    memory: SparseMemory,
    references: Sequence[Reference],
    *,
    where: str,
) -> np.ndarray:
    """Validate a write before anything is stored.

    Args:
        info: The store's description.
        ids: `(N,)` reference ids.
        memory: `N` sparse memories.
        references: `N` references.
        where: Name of the store, for messages.

    Returns:
        The ids as a `(N,)` int64 array.

    Raises:
        UserError: For counts that disagree, repeated or negative ids, memories of another
            shape or of a non-float dtype, or malformed references.
    """
    array = as_reference_ids(ids, where=where)
    if not (len(array) == len(memory) == len(references)):
        raise UserError(
            f"{where}: write got {len(array)} ids, {len(memory)} memories and "
            f"{len(references)} references; they must be as many"
        )
    if len(array) and array.min() < 0:
        raise UserError(f"{where}: reference ids must be ≥ 0, got {int(array.min())}")
    unique, counts = np.unique(array, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"{where}: reference id {int(unique[counts > 1][0])} is written twice")
    info.check_memory(memory, where=where)
    if not memory.keys.dtype.is_floating_point:
        raise UserError(f"{where}: memory keys must be floating point, got {memory.keys.dtype}")
    for reference_id, reference in zip(array.tolist(), references, strict=True):
        if not isinstance(reference, tuple) or len(reference) != 4:
            raise UserError(
                f"{where}: reference {reference_id} must be an m3.core.references.Reference, "
                f"got {type(reference).__name__}"
            )
        doc_id = reference[0]
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int, np.integer)):
            raise UserError(
                f"{where}: reference {reference_id} has doc_id {doc_id!r}; "
                "a document id is a str or an int"
            )
    return array


def missing_error(ids: np.ndarray, slots: np.ndarray, *, where: str) -> MissingReferenceError:
    """The error for ids that are not stored.

    Args:
        ids: `(N,)` requested ids.
        slots: `(N,)` their slots, −1 for the missing ones.
        where: Name of the store.

    Returns:
        An error naming the first missing id and how many more there are.
    """
    absent = np.unique(ids[slots < 0])
    more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
    return MissingReferenceError(f"reference {int(absent[0])} is not in {where}{more}")


def normalise_reference(reference: Reference) -> Reference:
    """A reference with plain Python values (numpy or tensor token ids become ints).

    Args:
        reference: As written by the caller.

    Returns:
        An equal `Reference` of `str`/`int` doc id, `int` span and a tuple of `int` ids.
    """
    doc_id, start, end, ids = reference
    doc_id = doc_id if isinstance(doc_id, str) else int(doc_id)
    return Reference(doc_id, int(start), int(end), tuple(int(i) for i in ids))


# ----------------------------------------------------------------------------------- indexes
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
    return check_choice(where, "metric", metric, METRICS)


def check_dim(dim: int, *, where: str) -> int:
    """Validate an embedding dimension (a positive integer).

    Args:
        dim: The dimension.
        where: Name of the index for the message.

    Returns:
        The dimension as an int.

    Raises:
        UserError: For a non-integer or a dimension below 1.
    """
    return check_int(where, "dim", dim, low=1)


def check_k(k: int, *, where: str) -> int:
    """Validate the number of neighbours asked for (a positive integer).

    Args:
        k: Neighbours per query.
        where: Name of the index for the message.

    Returns:
        k as an int.

    Raises:
        UserError: For a non-integer or a k below 1.
    """
    return check_int(where, "k", k, low=1)


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


def as_index_ids(ids: Tensor | np.ndarray | Sequence[int], count: int, *, where: str) -> np.ndarray:
    """Check a batch of reference ids given to an index.

    Args:
        ids: `(N,)` integer ids, each ≥ 0 (−1 means "no hit" in results) and distinct.
        count: The expected N (the number of vectors that come with them), or −1 for any.
        where: Name of the index for messages.

    Returns:
        `(N,)` int64 numpy array.

    Raises:
        UserError: For a wrong shape, a non-integer dtype, negative or repeated ids.
    """
    out = as_ids(ids, where=where, what="ids")
    if count >= 0 and out.size != count:
        raise UserError(f"{where}: got {out.size} ids for {count} embeddings")
    if out.size and int(out.min()) < 0:
        raise UserError(f"{where}: ids must be ≥ 0 (−1 means no hit), got {int(out.min())}")
    if np.unique(out).size != out.size:
        raise UserError(f"{where}: ids must be distinct within one call")
    return out


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
