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

Ids become slots through `m3.backends.slots` (`SlotMap`, `SlotAllocator`), and writes are
checked by `m3.backends.checks`; the checks a store of your own needs (`as_reference_ids`,
`check_write`, `normalise_reference`) import from there, and from here as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryStore, StoreInfo, with_quantizer
from m3.backends.checks import as_reference_ids, check_write, missing_error, normalise_reference
from m3.backends.slots import SlotAllocator, SlotMap
from m3.core.checks import check_int
from m3.core.memories import SparseMemory
from m3.core.references import Reference

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer


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
        capacity = check_int("InMemoryStore", "capacity", capacity, low=0)
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
