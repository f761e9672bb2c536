"""The two backend contracts: a store of encoded references and a search index over them.

A store holds, per int64 reference id, the reference's sparse memory
(`m3.core.memories.SparseMemory`), its token ids and its provenance
(`m3.core.references.Reference`). An index maps query embeddings to reference ids. They are
separate things joined by ids (−1 = no hit), as in FAISS and ScaNN, so either can be swapped
without touching the other.

Both are picklable without open file handles (they reopen lazily in each process, e.g. in a
DataLoader worker), and every shipped subclass passes the contract tests in
`tests/test_backends_contract.py` (stores) and `tests/test_indexes_contract.py` (indexes);
a user's subclass can run the same suites.
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer

#: torch dtypes a store may hold keys and values in, by name
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MissingReferenceError(UserError, KeyError):
    """A reference id that is not in the store (or was deleted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing reference"


class CorruptReferenceError(UserError):
    """Stored bytes of a reference do not match their checksum (a damaged or truncated file)."""


@dataclass(frozen=True)
class StoreInfo:
    """What a store says about itself, so that it is never read by the wrong model.

    Attributes:
        memory_shape: Shape of one memory, `(L_mem, 2, H_kv, k, d_h)`.
        dtype: Name of the keys' and values' dtype: "float32", "bfloat16" or "float16"
            (bf16 is stored as its 16-bit pattern).
        model_config: The writing model's `Config.to_dict()`.
        model_fingerprint: Fingerprint of the weights that wrote the memories.
        tokenizer_fingerprint: Fingerprint of the tokenizer that produced the token ids.
        reference_prefix: Token ids of the `<s>Reference:` prefix used when encoding.
        quantizer: The vector quantizer of the stored key and value vectors
            (`MemoryQuantizer.store_description()`: class, fingerprint, settings, code
            sizes), or None for raw vectors. A quantized store keeps codes and decodes on
            read, to `dtype`.
        extra: Free-form metadata (e.g. the build's recipe).
    """

    memory_shape: tuple[int, ...]
    dtype: str
    model_config: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    reference_prefix: tuple[int, ...] = ()
    quantizer: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise UserError(
                f"store dtype must be one of {sorted(STORE_DTYPES)}, got {self.dtype!r}"
            )
        if len(self.memory_shape) != 5 or self.memory_shape[1] != 2:
            raise UserError(
                f"memory_shape must be (L_mem, 2, H_kv, k, d_h), got {tuple(self.memory_shape)}"
            )
        object.__setattr__(self, "memory_shape", tuple(int(s) for s in self.memory_shape))
        object.__setattr__(self, "reference_prefix", tuple(int(i) for i in self.reference_prefix))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a `torch.dtype` (of the decoded keys and values when quantized)."""
        return STORE_DTYPES[self.dtype]

    @property
    def vector_bytes(self) -> tuple[int, int]:
        """Bytes of one stored key vector and of one stored value vector.

        Returns:
            `(key bytes, value bytes)`: the quantizers' `code_bytes` when `quantizer` is
            set, else `d_h · itemsize` of `dtype` for both.
        """
        if self.quantizer is not None:
            return (int(self.quantizer["keys"]["code_bytes"]),
                    int(self.quantizer["values"]["code_bytes"]))  # fmt: skip
        raw = self.memory_shape[4] * self.torch_dtype.itemsize
        return raw, raw

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(asdict(self), sort_keys=True)

    def with_extra(self, **extra: Any) -> StoreInfo:
        """A copy with more entries in `extra` (e.g. the rank that writes a shard).

        Args:
            **extra: JSON-serialisable entries, replacing those of the same name.

        Returns:
            The new store info.
        """
        return replace(self, extra={**self.extra, **extra})

    @classmethod
    def from_json(cls, text: str) -> StoreInfo:
        """Parse what `to_json` wrote.

        Args:
            text: The JSON string.

        Returns:
            The store info.
        """
        data = json.loads(text)
        data["memory_shape"] = tuple(data["memory_shape"])
        data["reference_prefix"] = tuple(data.get("reference_prefix", ()))
        return cls(**data)

    def check_memory(self, memory: SparseMemory, *, where: str = "store") -> None:
        """Refuse memories of another shape, naming the dimension that differs.

        Args:
            memory: Memories about to be written.
            where: Name of the store for the message.

        Raises:
            UserError: When a dimension differs.
        """
        names = ("memory layers (L_mem)", "K/V", "key/value heads (H_kv)", "kept tokens (k)",
                 "head dimension (d_h)")  # fmt: skip
        for name, got, want in zip(names, memory.shape, self.memory_shape, strict=True):
            if got != want:
                raise UserError(f"{where}: memory {name} is {got}, the store holds {want}")

    def check_model(self, memory_shape: tuple[int, ...], fingerprint: str, *, where: str) -> None:
        """Refuse to serve memories written by another model or other weights.

        Args:
            memory_shape: The reading model's `Config.memory_shape`.
            fingerprint: The reading model's weights fingerprint.
            where: Name of the store (a path) for the message.

        Raises:
            UserError: Naming the differing dimension, or both fingerprints.
        """
        names = ("memory layers (L_mem)", "K/V", "key/value heads (H_kv)", "kept tokens (k)",
                 "head dimension (d_h)")  # fmt: skip
        for name, got, want in zip(names, memory_shape, self.memory_shape, strict=True):
            if got != want:
                raise UserError(f"{where}: the model's {name} is {got}, the store holds {want}")
        if self.model_fingerprint and fingerprint != self.model_fingerprint:
            raise UserError(
                f"{where} was written by weights {self.model_fingerprint[:16]}, but the model has "
                f"weights {fingerprint[:16]}: rebuild the memory bank for these weights"
            )


def with_quantizer(
    info: StoreInfo, quantizer: MemoryQuantizer | None, *, where: str = "store"
) -> StoreInfo:
    """The store description with a quantizer recorded in `quantizer`.

    Args:
        info: What the store holds.
        quantizer: A trained quantizer of the key and value vectors, or None for raw ones.
        where: Name of the store, for messages.

    Returns:
        `info` with `quantizer` set to `quantizer.store_description()` (class, fingerprint,
        settings and code sizes); `info` unchanged when `quantizer` is None.

    Raises:
        UserError: For an untrained quantizer, one of another head dimension, or an `info`
            that already records another quantizer.
    """
    if quantizer is None:
        return info
    if not quantizer.fitted:
        raise UserError(f"{where}: the quantizer is not trained: call fit first")
    if quantizer.keys.dim != info.memory_shape[4]:
        raise UserError(
            f"{where}: the quantizer codes {quantizer.keys.dim}-dim vectors, the store holds "
            f"head dimension (d_h) {info.memory_shape[4]}"
        )
    description = quantizer.store_description()
    recorded = None if info.quantizer is None else info.quantizer.get("fingerprint")
    if info.quantizer is not None and recorded != description["fingerprint"]:
        raise UserError(
            f"{where}: info records quantizer {str(recorded)[:16]}, "
            f"but the given one is {description['fingerprint'][:16]}"
        )
    return replace(info, quantizer=description)


class MemoryStore(ABC):
    """A table of encoded references keyed by int64 reference id.

    Writes of an existing id overwrite it (update); `delete` removes ids. Reads return
    memories in the order asked. Subclasses must be picklable without open handles.
    """

    info: StoreInfo

    @abstractmethod
    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Add references, or overwrite the ones whose ids are already stored.

        Args:
            ids: `(N,)` int64 reference ids (distinct, ≥ 0).
            memory: Their sparse memories, `N` of them, of shape `info.memory_shape`.
            references: Their token ids and provenance, in the same order.
        """

    @abstractmethod
    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories.

        Args:
            ids: `(N,)` reference ids, repeats allowed.

        Returns:
            Their sparse memories in the order of `ids`, in `info.torch_dtype` on the CPU:
            the caller's to keep or change (never a view of what the store holds).

        Raises:
            MissingReferenceError: For an id that is not stored.
            CorruptReferenceError: When stored bytes fail their checksum.
        """

    @abstractmethod
    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references.

        Args:
            ids: Reference ids.

        Returns:
            One `Reference` per id, in order.
        """

    @abstractmethod
    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Remove references.

        Args:
            ids: Reference ids; each must be stored.
        """

    @abstractmethod
    def ids(self) -> Tensor:
        """All stored reference ids, `(N,)` int64, ascending."""

    @abstractmethod
    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check stored bytes against their checksums.

        Args:
            ids: References to check; all when None.

        Returns:
            The ids whose bytes are damaged (empty when all is well).
        """

    def __len__(self) -> int:
        return int(self.ids().numel())

    def __contains__(self, reference_id: object) -> bool:
        if not isinstance(reference_id, int):
            return False
        return bool((self.ids() == reference_id).any())

    def close(self) -> None:  # noqa: B027 - optional hook: in-RAM stores hold nothing to close
        """Release open files; the store reopens lazily when used again."""

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SearchResult(NamedTuple):
    """Nearest references of a batch of queries.

    Attributes:
        scores: `(Q, k)` float32 similarities, best first.
        ids: `(Q, k)` int64 reference ids, −1 where fewer than `k` were found.
    """

    scores: Tensor
    ids: Tensor


class MemoryIndex(ABC):
    """Nearest-neighbour search from query embeddings to reference ids.

    Args of subclasses name their metric ("cosine" or "dot") and dimension; `add` then
    `build` before `search`; `save`/`load` persist the index to a directory.
    """

    metric: str
    dim: int

    @abstractmethod
    def add(self, embeddings: Tensor, ids: Tensor) -> None:
        """Add vectors (re-adding an id replaces its vector).

        Args:
            embeddings: `(N, dim)` float vectors.
            ids: `(N,)` int64 reference ids.
        """

    @abstractmethod
    def remove(self, ids: Tensor) -> None:
        """Remove vectors by reference id.

        Args:
            ids: `(N,)` int64 reference ids.
        """

    def build(self) -> None:  # noqa: B027 - exact search needs no build step
        """Build the search structure after adding vectors (a no-op for exact search)."""

    @abstractmethod
    def search(self, queries: Tensor, k: int) -> SearchResult:
        """The `k` nearest references of each query.

        Args:
            queries: `(Q, dim)` float vectors.
            k: Neighbours per query.

        Returns:
            Scores and ids, `(Q, k)` each.
        """

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the index to a directory (created if needed).

        Args:
            directory: Where to write.
        """

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path) -> MemoryIndex:
        """Read an index that `save` wrote.

        Args:
            directory: Where it was written.

        Returns:
            The index.
        """

    @classmethod
    def discard(cls, directory: str | Path) -> None:
        """Delete a folder that `save` wrote, and whatever it alone keeps elsewhere.

        The bank's garbage collection calls it for index folders no manifest names any
        more. By default the folder is deleted; an index that keeps its vectors outside
        the folder (`MilvusIndex`: a collection) releases them too.

        Args:
            directory: The folder; one that is already gone is no error.
        """
        shutil.rmtree(directory, ignore_errors=True)

    def ids(self) -> Tensor:
        """The stored reference ids, `(N,)` int64, ascending.

        `m3 verify` compares them with the store's.

        Raises:
            NotImplementedError: For an index that cannot list its ids.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list its ids")

    @abstractmethod
    def __len__(self) -> int: ...
