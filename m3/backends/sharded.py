"""Several stores read as one: a bank written by many ranks, one shard each, and its edits.

`ShardedStore` routes each id to the one shard that holds it. `LayeredStore` reads a bank
with the layers its edits wrote on top (`m3.bank.layers`): the newest layer that holds an id
serves it, and the ids a layer removed are hidden from the layers below.

**Provenance from the reference table.** A bank built with a reference table
(`m3.bank.table`, `<bank>/references/`) opens as a `ShardedStore` given that `table`: the
token ids and provenance of the ids its shards hold are read from the table's memory-mapped
arrays (`references`, and `reference_tokens` for the leakage filter), not through h5py;
memories still come from the shards. In a `LayeredStore` the built bank is layer 0: the ids
it serves come from its table, the ids an edit wrote from that edit's layer. Without a
table (a bank built before it existed) every id's provenance is read from the shards, as
before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryStore, MissingReferenceError
from m3.backends.checks import as_reference_ids
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference


class ShardedStore(MemoryStore):
    """Several shards read as one store (read-only), routing each id to its shard.

    Args:
        shards: The shards; each id must be in one of them only.
        table: The references of every id the shards hold, by id (a bank's
            `m3.bank.table.ReferenceTable`; anything whose `table[i]` is reference `i`, and
            whose `tokens(ids)`, when it has one, gives their token ids): provenance is read
            from it instead of the shards. None reads it from the shards.

    Raises:
        UserError: For shards of different memory shapes, dtypes, weights or quantizers, or an
            id held by two shards.
    """

    def __init__(
        self, shards: Sequence[MemoryStore], *, table: Sequence[Reference] | None = None
    ) -> None:
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
        self.quantizer = getattr(shards[0], "quantizer", None)
        self._ids, self._owner = self._routing([s.ids().numpy() for s in self.shards])
        self._table = table

    @property
    def table(self) -> Sequence[Reference] | None:
        """The reference table provenance is read from (None: the shards)."""
        return self._table

    def table_ids(self) -> np.ndarray:
        """The ids whose provenance `table` serves, `(N,)` int64, ascending (all, or none)."""
        return self._ids.copy() if self._table is not None else self._ids[:0].copy()

    def _routing(self, ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The ids served, ascending, and the shard that serves each: every id is in one shard."""
        owner = np.concatenate([np.full(len(a), i) for i, a in enumerate(ids)])
        flat = np.concatenate(ids)
        order = np.argsort(flat, kind="stable")
        flat, owner = flat[order], owner[order]
        if len(flat) > 1 and (repeat := flat[1:] == flat[:-1]).any():
            raise UserError(f"reference {int(flat[1:][repeat][0])} is in two shards")
        return flat, owner

    def _route(self, ids: Sequence[int] | Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The ids as an array and the store that serves each; a missing id is named."""
        array = as_reference_ids(ids, where=type(self).__name__)
        if len(self._ids) == 0:
            if len(array):
                raise MissingReferenceError(f"reference {int(array[0])} is not in the bank")
            return array, self._owner
        where = np.minimum(np.searchsorted(self._ids, array), len(self._ids) - 1)
        if (missing := array[self._ids[where] != array]).size:
            raise MissingReferenceError(f"reference {int(missing[0])} is not in the bank")
        return array, self._owner[where]

    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories from their shards (see `MemoryStore.read`): `(N, L_mem, H_kv, k, d_h)`.

        The shard serving most ids reads the whole batch (each id of another shard stands in
        as one of its own ids, read once), and the few rows of the other shards are copied
        over: one read and no copy of the batch, as fast as one store (an edited bank's
        layers serve a few ids each).
        """
        array, owner = self._route(ids)
        serving, counts = np.unique(owner, return_counts=True)
        if len(serving) <= 1:  # one shard serves them all (or none is asked): its read as is
            return self.shards[int(serving[0]) if len(serving) else 0].read(torch.from_numpy(array))
        carrier = int(serving[np.argmax(counts)])
        own = owner == carrier
        memory = (
            self.shards[carrier]
            .read(torch.from_numpy(np.where(own, array, array[own][0])))
            .to("cpu")
        )
        for shard in serving.tolist():
            if shard == carrier:
                continue
            rows = np.flatnonzero(owner == shard)
            part = self.shards[shard].read(torch.from_numpy(array[rows])).to("cpu")
            for name in ("keys", "values", "valid", "positions"):
                whole, piece = getattr(memory, name), getattr(part, name)
                for j, row in enumerate(rows.tolist()):  # row by row: fastest into a strided view
                    whole[row].copy_(piece[j])
        return memory

    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references, in order (see the module docs).

        Args:
            ids: `(N,)` reference ids.

        Returns:
            One `Reference` per id.

        Raises:
            MissingReferenceError: For an id that is not served.
        """
        array, owner = self._route(ids)
        if self._table is not None:
            table = self._table
            return [table[i] for i in array.tolist()]
        return self._gathered(array, owner, lambda store, part: store.references(part))

    def reference_tokens(self, ids: Sequence[int] | Tensor) -> list[np.ndarray]:
        """The token ids of references, in order, without their provenance.

        What the leakage filter reads (`m3.retrieval.retriever.Retriever`): from the table's
        mapped arrays when there is one (`ReferenceTable.tokens`), else from the shards.

        Args:
            ids: `(N,)` reference ids.

        Returns:
            One `(L_i,)` integer array per id (read-only: it may be a view of a mapped file).

        Raises:
            MissingReferenceError: For an id that is not served.
        """
        array, owner = self._route(ids)
        table = self._table
        if table is not None:
            tokens = getattr(table, "tokens", None)
            if tokens is not None:
                return list(tokens(array))
            return [np.asarray(table[i].ids, dtype=np.int64) for i in array.tolist()]
        return self._gathered(array, owner, _tokens_of)

    def _gathered(self, array: np.ndarray, owner: np.ndarray, read: Any) -> list[Any]:
        """`read(store, ids)` of each serving store for its ids, put back in the asked order."""
        out: list[Any] = [None] * len(array)
        for serving in np.unique(owner).tolist():
            rows = np.flatnonzero(owner == serving)
            got = read(self.shards[serving], torch.from_numpy(array[rows]))
            for row, value in zip(rows.tolist(), got, strict=True):
                out[row] = value
        return out

    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Refused: a bank opened with `open_bank` is read-only."""
        raise UserError("a sharded bank is read-only: change it with m3 edit")

    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Refused: a bank opened with `open_bank` is read-only."""
        raise UserError("a sharded bank is read-only: change it with m3 edit")

    def ids(self) -> Tensor:
        """The ids served, `(N,)` int64, ascending."""
        return torch.from_numpy(self._ids.copy())

    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check the stored bytes of the ids served (all when None); the damaged ids, ascending."""
        array, owner = self._route(self._ids if ids is None else ids)
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


class LayeredStore(ShardedStore):
    """A bank and the layers its edits wrote, read as one store (read-only).

    Layer 0 is the bank as built; layer `n` holds the references edit `n` wrote and names
    the ids it removed. An id is served by the newest layer that holds it, unless a newer
    layer removed it: exactly the bank after every edit, in order (paper §1, knowledge
    editing), without rewriting the layers below.

    Args:
        layers: The stores, oldest (the built bank) first.
        removed: Per layer, the ids its edit removed (the built bank's entry is empty).

    Raises:
        UserError: For layers of different memory shapes, dtypes, weights or quantizers, or
            a `removed` of another length than `layers`.
    """

    def __init__(self, layers: Sequence[MemoryStore], removed: Sequence[Sequence[int]]) -> None:
        if len(removed) != len(layers):
            raise UserError(f"{len(layers)} layers but {len(removed)} lists of removed ids")
        self._removed = [np.asarray(r, dtype=np.int64) for r in removed]
        super().__init__(layers)

    @property
    def table(self) -> Sequence[Reference] | None:
        """The built bank's reference table (layer 0's), None without one."""
        return getattr(self.shards[0], "table", None)

    def table_ids(self) -> np.ndarray:
        """The ids whose provenance the built bank's table serves: those layer 0 serves."""
        if self.table is None:
            return self._ids[:0].copy()
        return self._ids[self._owner == 0]

    def _routing(self, ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Apply the layers in order: each hides the ids it removed, then serves its own."""
        served = np.zeros(0, dtype=np.int64)
        owner = np.zeros(0, dtype=np.int64)
        for layer, (held, gone) in enumerate(zip(ids, self._removed, strict=True)):
            keep = ~np.isin(served, np.concatenate([gone, held]))
            served = np.concatenate([served[keep], held])
            owner = np.concatenate([owner[keep], np.full(len(held), layer)])
        order = np.argsort(served, kind="stable")
        return served[order], owner[order]


def _tokens_of(store: MemoryStore, ids: Tensor) -> list[np.ndarray]:
    """A store's token ids of references: its `reference_tokens`, else its `references`."""
    fast = getattr(store, "reference_tokens", None)
    if fast is not None:
        return list(fast(ids))
    return [np.asarray(r.ids, dtype=np.int64) for r in store.references(ids)]


def shards_of(store: MemoryStore) -> list[MemoryStore]:
    """The shards of a store: a `ShardedStore`'s, or the store itself as the only one.

    Args:
        store: Any store.

    Returns:
        Its shards, in order.
    """
    return list(store.shards) if isinstance(store, ShardedStore) else [store]
