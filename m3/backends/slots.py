"""Where each reference id lives: slots of a store, rows of an index.

A store keeps every reference in a fixed-size slot and reuses the slots of deleted ones:
`SlotMap` maps ids to slots (one gather per lookup for compact ids), `SlotAllocator` hands
out free slots (the lowest freed one first, then fresh ones). `InMemoryStore` and
`HDF5Store` both use them.

An index keeps its vectors in dense rows: `Rows` maps ids to rows and deletes by moving the
last row into the hole (as ScaNN's own delete does, so that both agree row for row);
`VectorRows` keeps the `(N, dim)` float32 vectors in the same rows (`ExactIndex`, and
`ScannIndex` before its first build).
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MissingReferenceError

#: ids up to this bound always use the direct lookup table; beyond it, only while the table
#: stays within `_LUT_SLACK` times the number of stored ids (else a dict is used).
_LUT_MIN = 1 << 20
_LUT_SLACK = 8


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


class Rows:
    """Which reference id sits in which row of a dense table of N rows.

    Deleting row r moves the last row into r (swap with last), as ScaNN's own delete does,
    so that both stay dense and agree row for row.

    Args:
        ids: `(N,)` ids of rows `0 … N−1`; None for an empty table.

    Attributes:
        ids: int64 ids by row; the first `n` are in use, the rest is room to grow.
        n: Number of rows in use.
    """

    def __init__(self, ids: np.ndarray | None = None) -> None:
        self.ids = np.zeros(0, dtype=np.int64) if ids is None else ids.astype(np.int64)
        self.n = int(self.ids.size)
        self._row = {int(i): r for r, i in enumerate(self.ids[: self.n].tolist())}

    def stored(self) -> np.ndarray:
        """The ids of the rows in use, `(n,)` int64, in row order (a view)."""
        return self.ids[: self.n]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The rows of ids.

        Args:
            ids: `(N,)` int64 ids.

        Returns:
            `(N,)` int64 rows, −1 for the ids not stored.
        """
        get = self._row.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=ids.size)

    def append(self, ids: np.ndarray) -> np.ndarray:
        """Give new ids the next rows.

        Args:
            ids: `(N,)` int64 ids, none of them stored.

        Returns:
            Their rows, `(N,)` int64.
        """
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
        """Delete ids one after another, each time moving the last row into the hole.

        Args:
            ids: `(N,)` int64 ids, each stored.
            where: Name of the index, for the message.

        Returns:
            The moves `(row, last)`, in order: row `last` moved into `row`.

        Raises:
            MissingReferenceError: For an id that is not stored (nothing is deleted then).
        """
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


class VectorRows(Rows):
    """`Rows` plus the `(N, dim)` float32 vectors themselves, in the same rows.

    Args:
        dim: Dimension of the vectors.
        vectors: `(N, dim)` float32 vectors of rows `0 … N−1`; None for none.
        ids: `(N,)` their ids.

    Attributes:
        data: `(capacity, dim)` float32; the first `n` rows are in use.
    """

    def __init__(self, dim: int, vectors: Tensor | None = None, ids: np.ndarray | None = None):
        super().__init__(ids)
        self.data = torch.zeros(0, dim) if vectors is None else vectors.contiguous()

    def vectors(self) -> Tensor:
        """The vectors of the rows in use, `(n, dim)` (a view)."""
        return self.data[: self.n]

    def upsert(self, vectors: Tensor, ids: np.ndarray) -> None:
        """Overwrite the vectors of stored ids and append the others.

        Args:
            vectors: `(N, dim)` float32 vectors.
            ids: `(N,)` distinct int64 ids.
        """
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
        """Delete ids and their vectors, keeping the rows dense (see `Rows.delete`).

        Args:
            ids: `(N,)` int64 ids, each stored.
            where: Name of the index, for the message.

        Raises:
            MissingReferenceError: For an id that is not stored (nothing is deleted then).
        """
        moves = self.delete(ids, where=where)
        source = np.arange(self.n + len(moves))
        for row, last in moves:
            source[row] = source[last]
        source = source[: self.n]
        changed = np.nonzero(source != np.arange(self.n))[0]
        if changed.size:  # gather first, then scatter: each source is read before it is overwritten
            self.data[torch.from_numpy(changed)] = self.data[torch.from_numpy(source[changed])]

    def trimmed(self) -> tuple[Tensor, np.ndarray]:
        """Copies of the vectors and ids in use, without the room to grow (to save or pickle)."""
        return self.vectors().clone(), self.stored().copy()
