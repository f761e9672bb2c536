"""Several stores read as one: a bank written by many ranks, one shard each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryStore, MissingReferenceError
from m3.backends.checks import as_reference_ids
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference

if TYPE_CHECKING:
    pass


class ShardedStore(MemoryStore):
    """Several shards read as one store (read-only), routing each id to its shard.

    Args:
        shards: The shards; each id must be in one of them only.

    Raises:
        UserError: For shards of different memory shapes, dtypes, weights or quantizers, or an
            id held by two shards.
    """

    def __init__(self, shards: Sequence[MemoryStore]) -> None:
        if not shards:
            raise UserError("a sharded store needs at least one shard")
        first = shards[0].info
        for shard in shards[1:]:
            if (shard.info.memory_shape, shard.info.dtype, shard.info.model_fingerprint,
                (shard.info.quantizer or {}).get("fingerprint")) != (
                first.memory_shape, first.dtype, first.model_fingerprint,
                (first.quantizer or {}).get("fingerprint"),
            ):  # fmt: skip
                raise UserError(f"{shard} holds other memories than {shards[0]}")
        self.shards = list(shards)
        self.info = first.with_extra(rank=None)
        ids = [s.ids().numpy() for s in self.shards]
        owner = np.concatenate([np.full(len(a), i) for i, a in enumerate(ids)])
        flat = np.concatenate(ids)
        order = np.argsort(flat, kind="stable")
        self._ids, self._owner = flat[order], owner[order]
        if len(self._ids) > 1 and (repeat := self._ids[1:] == self._ids[:-1]).any():
            raise UserError(f"reference {int(self._ids[1:][repeat][0])} is in two shards")

    def _route(self, ids: Sequence[int] | Tensor) -> tuple[np.ndarray, np.ndarray]:

        array = as_reference_ids(ids, where=type(self).__name__)
        where = np.searchsorted(self._ids, array).clip(max=max(len(self._ids) - 1, 0))
        if len(self._ids) == 0 or (self._ids[where] != array).any():
            missing = array if len(self._ids) == 0 else array[self._ids[where] != array]
            raise MissingReferenceError(f"reference {int(missing[0])} is not in the bank")
        return array, self._owner[where]

    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories from their shards (see `MemoryStore.read`): `(N, L_mem, H_kv, k, d_h)`."""
        array, owner = self._route(ids)
        if len(array) == 0:
            return self.shards[0].read([])
        parts, positions = [], []
        for shard in np.unique(owner).tolist():
            rows = np.flatnonzero(owner == shard)
            parts.append(self.shards[shard].read(torch.from_numpy(array[rows])).to("cpu"))
            positions.append(rows)
        memory = SparseMemory.cat([SparseMemory(p.keys.clone(), p.values.clone(), p.valid,
                                                p.positions) for p in parts])  # fmt: skip
        inverse = np.empty(len(array), dtype=np.int64)
        inverse[np.concatenate(positions)] = np.arange(len(array))
        return memory[torch.from_numpy(inverse)]

    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references, in order."""
        array, owner = self._route(ids)
        return [
            self.shards[o].references([i])[0]
            for i, o in zip(array.tolist(), owner.tolist(), strict=True)
        ]

    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Refused: a bank opened with `open_bank` is read-only."""
        raise UserError("a sharded bank is read-only: rebuild it with m3 build-memory")

    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Refused: a bank opened with `open_bank` is read-only."""
        raise UserError("a sharded bank is read-only: rebuild it with m3 build-memory")

    def ids(self) -> Tensor:
        """All reference ids of every shard, `(N,)` int64, ascending."""
        return torch.from_numpy(self._ids.copy())

    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check stored bytes in every shard; the damaged ids, ascending."""
        if ids is None:
            return sorted(i for s in self.shards for i in s.verify())
        array, owner = self._route(ids)
        return sorted(
            i
            for o in np.unique(owner).tolist()
            for i in self.shards[o].verify(torch.from_numpy(array[owner == o]))
        )

    def __len__(self) -> int:
        return len(self._ids)

    def close(self) -> None:
        """Close every shard."""
        for shard in self.shards:
            shard.close()


def shards_of(store: MemoryStore) -> list[MemoryStore]:
    """The shards of a store: a `ShardedStore`'s, or the store itself as the only one.

    Args:
        store: Any store.

    Returns:
        Its shards, in order.
    """
    return list(store.shards) if isinstance(store, ShardedStore) else [store]
