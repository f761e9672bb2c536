"""A memory store in RAM: torch tensors read with one `index_select` each.

`InMemoryStore` suits small banks, tests, and caches in front of a disk store. It keeps keys,
values, validity masks and positions in preallocated tensors that grow geometrically (so
appends cost amortised O(1) copies); deleting a reference frees its slot for the next write.
Pickling a store copies its data (what a DataLoader worker started by `spawn` receives).

```python
from m3.backends.in_memory import InMemoryStore

store = InMemoryStore(StoreInfo(memory_shape=config.memory_shape, dtype="bfloat16"))
store.write(ids, memory, references)        # memory: SparseMemory of len(ids) references
memory = store.read(torch.tensor([3, 1, 3]))
```

With `quantizer=` (a trained `m3.memory.quantize.MemoryQuantizer`) the store keeps codes in RAM and
decodes on read, e.g. 14 bytes instead of 160 per 80-dim bf16 vector at the paper's settings.

The module also holds the two pieces both shipped stores use to turn reference ids into
storage slots: `SlotMap` (id -> slot) and `SlotAllocator` (which slots are free).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryStore, MissingReferenceError, StoreInfo, with_quantizer
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer

#: ids up to this bound always use the direct lookup table; beyond it, only while the table
#: stays within `_LUT_SLACK` times the number of stored ids (else a dict is used).
_LUT_MIN = 1 << 20
_LUT_SLACK = 8


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
    if isinstance(ids, Tensor):
        if ids.dtype == torch.int64 and ids.dim() == 1 and ids.is_cpu:
            return ids.numpy()  # the usual case, on every read: nothing to check or convert
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise UserError(f"{where}: reference ids must be integers, got a {ids.dtype} tensor")
        if ids.dim() > 1:
            raise UserError(f"{where}: reference ids must be 1-D, got shape {tuple(ids.shape)}")
        return ids.detach().cpu().reshape(-1).numpy().astype(np.int64, copy=False)
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise UserError(f"{where}: reference ids must be integers, got {list(ids)[:5]!r}")
    if array.ndim != 1:
        raise UserError(f"{where}: reference ids must be 1-D, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


class SlotMap:
    """Reference id -> storage slot, with vectorised lookups and O(batch) updates.

    Ids in a compact range (the usual 0..N−1) live in a direct lookup table, so a lookup is
    one gather; ids spread over a wide range (hashes) fall back to a dict.
    """

    def __init__(self) -> None:
        self._table = np.full(0, -1, dtype=np.int64)  # id -> slot, −1 absent
        self._dict: dict[int, int] | None = None  # used instead of the table for sparse ids
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ids.

        Args:
            ids: `(N,)` int64 reference ids.

        Returns:
            `(N,)` int64 slots, −1 where an id is not stored.
        """
        if self._dict is not None:
            lookup = self._dict.get
            return np.fromiter((lookup(i, -1) for i in ids.tolist()), np.int64, len(ids))
        if len(self._table) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        # All inside the table (the usual case): one reduction, as negative ids read as
        # huge unsigned ones.
        if len(ids) and ids.view(np.uint64).max() < len(self._table):
            return self._table[ids]
        inside = (ids >= 0) & (ids < len(self._table))
        return np.where(inside, self._table[np.where(inside, ids, 0)], -1)

    def set(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Map ids to slots (new ids or moved ones).

        Args:
            ids: `(N,)` distinct int64 ids, ≥ 0.
            slots: `(N,)` int64 slots.
        """
        if len(ids) == 0:
            return
        self._count += int((self.get(ids) < 0).sum())
        top = int(ids.max())
        if self._dict is None and top >= len(self._table):
            if top < max(_LUT_MIN, _LUT_SLACK * self._count):
                grown = np.full(max(top + 1, 2 * len(self._table)), -1, dtype=np.int64)
                grown[: len(self._table)] = self._table
                self._table = grown
            else:
                used = np.flatnonzero(self._table >= 0)
                self._dict = dict(zip(used.tolist(), self._table[used].tolist(), strict=True))
                self._table = np.full(0, -1, dtype=np.int64)
        if self._dict is not None:
            self._dict.update(zip(ids.tolist(), slots.tolist(), strict=True))
        else:
            self._table[ids] = slots

    def remove(self, ids: np.ndarray) -> None:
        """Forget ids (each must be stored).

        Args:
            ids: `(N,)` distinct int64 ids.
        """
        self._count -= len(ids)
        if self._dict is not None:
            for i in ids.tolist():
                del self._dict[i]
        else:
            self._table[ids] = -1

    def ids(self) -> np.ndarray:
        """All stored ids, `(N,)` int64, ascending."""
        if self._dict is not None:
            return np.sort(np.fromiter(self._dict, np.int64, len(self._dict)))
        return np.flatnonzero(self._table >= 0).astype(np.int64)


class SlotAllocator:
    """Which storage slots are free: the lowest freed slot first, then fresh ones.

    Args:
        used: `(S,)` bool: which of the first `S` slots are taken; slots from `S` on are fresh.
    """

    def __init__(self, used: np.ndarray | None = None) -> None:
        used = np.zeros(0, dtype=bool) if used is None else used
        taken = np.flatnonzero(used)
        self.end = int(taken[-1]) + 1 if len(taken) else 0  # one past the last taken slot
        self._free = np.flatnonzero(~used[: self.end]).tolist()
        heapq.heapify(self._free)

    def take(self, count: int) -> np.ndarray:
        """Reserve slots.

        Args:
            count: How many.

        Returns:
            `(count,)` int64 slots, freed ones (lowest first) before fresh ones.
        """
        reused = [heapq.heappop(self._free) for _ in range(min(count, len(self._free)))]
        fresh = range(self.end, self.end + count - len(reused))
        self.end += len(fresh)
        return np.array([*reused, *fresh], dtype=np.int64)

    def give_back(self, slots: np.ndarray) -> None:
        """Free slots for reuse.

        Args:
            slots: `(N,)` int64 slots that were taken.
        """
        for slot in slots.tolist():
            heapq.heappush(self._free, slot)


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


class InMemoryStore(MemoryStore):
    """A memory store in RAM, read with `index_select`.

    Reads return contiguous tensors in `info.torch_dtype`; memories written in another
    floating dtype are cast to it on write (bit-exact when the dtypes agree). A quantized
    store keeps uint8 codes and returns `quantizer.decode(quantizer.encode(memory))` of what
    was written, in `info.torch_dtype`.

    Args:
        info: What the store holds: memory shape `(L_mem, 2, H_kv, k, d_h)`, dtype, and the
            model that writes it.
        capacity: References to preallocate room for (the store grows beyond it by doubling).
        quantizer: A trained `MemoryQuantizer` to keep codes instead of raw vectors (recorded
            in `info.quantizer`; a pickled copy carries it); None for raw vectors.

    Attributes:
        info: What the store holds (with the quantizer's description when quantized).
        quantizer: The quantizer, or None.

    Raises:
        UserError: For a negative capacity, or an untrained quantizer or one of another
            head dimension.
    """

    def __init__(
        self, info: StoreInfo, *, capacity: int = 0, quantizer: MemoryQuantizer | None = None
    ) -> None:
        if capacity < 0:
            raise UserError(f"InMemoryStore capacity must be ≥ 0, got {capacity}")
        self.info = with_quantizer(info, quantizer, where="in-memory store")
        self.quantizer = quantizer
        layers, _, heads, tokens, dim = info.memory_shape
        if quantizer is None:
            self._keys = torch.empty((capacity, layers, heads, tokens, dim), dtype=info.torch_dtype)
            self._values = torch.empty_like(self._keys)
        else:
            key_bytes, value_bytes = self.info.vector_bytes
            shape = (capacity, layers, heads, tokens)
            self._keys = torch.empty((*shape, key_bytes), dtype=torch.uint8)
            self._values = torch.empty((*shape, value_bytes), dtype=torch.uint8)
        self._valid = torch.zeros((capacity, tokens), dtype=torch.bool)
        self._positions = torch.full((capacity, layers, heads, tokens), -1, dtype=torch.long)
        self._references: list[Reference | None] = [None] * capacity
        self._slots = SlotMap()
        self._allocator = SlotAllocator()

    @property
    def capacity(self) -> int:
        """References the preallocated tensors hold before they grow."""
        return self._keys.shape[0]

    def _grow(self, needed: int) -> None:
        # Doubling keeps appends amortised O(1) per reference.
        size = max(needed, 2 * self.capacity, 16)

        def grown(tensor: Tensor, fill: float | bool) -> Tensor:
            out = tensor.new_full((size, *tensor.shape[1:]), fill)
            out[: tensor.shape[0]] = tensor
            return out

        self._keys = grown(self._keys, 0.0)
        self._values = grown(self._values, 0.0)
        self._valid = grown(self._valid, False)
        self._positions = grown(self._positions, -1)
        self._references.extend([None] * (size - len(self._references)))

    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Add references, or overwrite the ones whose ids are already stored.

        Args:
            ids: `(N,)` int64 reference ids (distinct, ≥ 0).
            memory: Their sparse memories: keys and values `(N, L_mem, H_kv, k, d_h)`,
                valid `(N, k)`, positions `(N, L_mem, H_kv, k)`.
            references: Their token ids and provenance, in the same order.

        Raises:
            UserError: For malformed input (see `check_write`); nothing is stored then.
        """
        array = check_write(self.info, ids, memory, references, where="in-memory store")
        slots = self._slots.get(array)
        new = slots < 0
        slots[new] = self._allocator.take(int(new.sum()))
        if self._allocator.end > self.capacity:
            self._grow(self._allocator.end)
        self._slots.set(array[new], slots[new])
        index = torch.from_numpy(slots)
        if self.quantizer is not None:
            codes = self.quantizer.encode(memory)
            keys, values = codes.keys.cpu(), codes.values.cpu()
        else:
            dtype = self.info.torch_dtype
            keys = memory.keys.detach().to("cpu", dtype)
            values = memory.values.detach().to("cpu", dtype)
        self._keys.index_copy_(0, index, keys)
        self._values.index_copy_(0, index, values)
        self._valid.index_copy_(0, index, memory.valid.cpu())
        self._positions.index_copy_(0, index, memory.positions.cpu().long())
        for slot, reference in zip(slots.tolist(), references, strict=True):
            self._references[slot] = normalise_reference(reference)

    def _find(self, ids: Sequence[int] | Tensor) -> tuple[np.ndarray, np.ndarray]:
        array = as_reference_ids(ids, where="in-memory store")
        slots = self._slots.get(array)
        if (slots < 0).any():
            raise missing_error(array, slots, where="the in-memory store")
        return array, slots

    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories.

        Args:
            ids: `(N,)` reference ids, repeats allowed.

        Returns:
            Their sparse memories in the order of `ids`: keys and values
            `(N, L_mem, H_kv, k, d_h)` in `info.torch_dtype`, valid `(N, k)`, positions
            `(N, L_mem, H_kv, k)`.

        Raises:
            MissingReferenceError: For an id that is not stored.
        """
        _, slots = self._find(ids)
        index = torch.from_numpy(slots)
        keys, values = self._keys.index_select(0, index), self._values.index_select(0, index)
        valid = self._valid.index_select(0, index)
        positions = self._positions.index_select(0, index)
        if self.quantizer is None:
            return SparseMemory(keys=keys, values=values, valid=valid, positions=positions)
        from m3.memory.quantize import QuantizedMemory

        if len(slots) == 0:  # nothing to decode: empty tensors of the decoded shape
            empty = torch.zeros((0, *self.info.memory_shape[:1], *self.info.memory_shape[2:]),
                                dtype=self.info.torch_dtype)  # fmt: skip
            return SparseMemory(empty, empty.clone(), valid, positions)
        codes = QuantizedMemory(keys, values, valid, positions)
        return self.quantizer.decode(codes, dtype=self.info.torch_dtype)

    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references.

        Args:
            ids: `(N,)` reference ids.

        Returns:
            One `Reference` per id, in order.

        Raises:
            MissingReferenceError: For an id that is not stored.
        """
        _, slots = self._find(ids)
        return [self._references[slot] for slot in slots.tolist()]  # type: ignore[misc]

    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Remove references; their slots are reused by later writes.

        Args:
            ids: `(N,)` reference ids; each must be stored.

        Raises:
            MissingReferenceError: For an id that is not stored (nothing is deleted then).
        """
        array, slots = self._find(ids)
        array, first = np.unique(array, return_index=True)
        slots = slots[first]
        self._slots.remove(array)
        self._allocator.give_back(slots)
        for slot in slots.tolist():
            self._references[slot] = None

    def ids(self) -> Tensor:
        """All stored reference ids, `(N,)` int64, ascending."""
        return torch.from_numpy(self._slots.ids())

    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check stored references: RAM holds no checksums, so nothing can be found damaged.

        Args:
            ids: References to check; all when None.

        Returns:
            An empty list.

        Raises:
            MissingReferenceError: For an id that is not stored.
        """
        if ids is not None:
            self._find(ids)
        return []

    def check_model(self, memory_shape: tuple[int, ...], fingerprint: str) -> None:
        """Refuse to serve a model of another memory shape or other weights.

        Args:
            memory_shape: The model's `Config.memory_shape`, `(L_mem, 2, H_kv, k, d_h)`.
            fingerprint: The model's `memory_fingerprint()`.

        Raises:
            UserError: Naming the differing dimension, or both fingerprints.
        """
        self.info.check_model(memory_shape, fingerprint, where="in-memory store")

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, reference_id: object) -> bool:
        if isinstance(reference_id, bool) or not isinstance(reference_id, (int, np.integer)):
            return False
        return bool(self._slots.get(np.array([reference_id], dtype=np.int64))[0] >= 0)

    def __getstate__(self) -> dict[str, object]:
        # Copy only the slots in use, not the preallocated room.
        state = self.__dict__.copy()
        end = self._allocator.end
        for name in ("_keys", "_values", "_valid", "_positions"):
            state[name] = getattr(self, name)[:end].clone()
        state["_references"] = self._references[:end]
        return state

    def __repr__(self) -> str:
        quantized = ", quantized" if self.quantizer is not None else ""
        return (
            f"InMemoryStore({len(self)} references, memory_shape={self.info.memory_shape}, "
            f"dtype={self.info.dtype}{quantized})"
        )
