"""Reading whole payload rows at the disk's raw speed: `os.preadv` into reused buffers.

h5py's own reads of scattered rows (fancy indexing) run about 100× slower than the disk on
chunked datasets, fall far behind it for small rows even on contiguous ones, and hold a
process-wide lock. An `HDF5Store` therefore asks HDF5 once for each segment's byte offset
(`m3.backends.hdf5_file.SlotTables`) and reads rows with `read_rows`: one `os.preadv` per
distinct row on a plain read-only file descriptor, in file order, into a buffer from
`RowBuffers` (`benchmarks/store_read.py` measures both ways).
"""

from __future__ import annotations

import itertools
import os
import weakref

import numpy as np


class RowBuffers:
    """Two kept buffers of whole rows to read into, each reused once nothing uses it.

    Fresh buffers cost page faults (about a third of a warm read of large rows). Each read
    gets a new view of a kept buffer, and the buffer is reused only after that view (and so
    every tensor made from it) is gone. Each buffer comes with its per-row `preadv` buffer
    lists (`[memoryview of row j]`), made once: the read loop then makes no Python object
    per row.

    Not thread-safe: callers hold their own lock around `take`.
    """

    def __init__(self) -> None:
        self._buffers: list[
            tuple[np.ndarray, list[list[memoryview]], weakref.ref[np.ndarray] | None]
        ] = []

    def take(self, count: int, row_bytes: int) -> tuple[np.ndarray, list[list[memoryview]]]:
        """A `(count, row_bytes)` array to read into, and the `preadv` buffers of its rows.

        Args:
            count: Rows to read.
            row_bytes: Size of a row.

        Returns:
            The array (a view of a kept buffer) and one buffer list per row of it.
        """
        free = [
            i
            for i, (buffer, _, view) in enumerate(self._buffers)
            if buffer.shape[0] >= count
            and buffer.shape[1] == row_bytes
            and (view is None or view() is None)
        ]
        if free:
            i = free[0]
            buffer, iov, _ = self._buffers[i]
        else:
            buffer = np.empty((count, row_bytes), dtype=np.uint8)
            flat = memoryview(buffer.reshape(-1))
            iov = [[flat[j * row_bytes : (j + 1) * row_bytes]] for j in range(count)]
            self._buffers = [*self._buffers[-1:], (buffer, iov, None)]
            i = len(self._buffers) - 1
        rows = buffer[:count]
        self._buffers[i] = (buffer, iov, weakref.ref(rows))
        return rows, iov


def read_rows(
    fd: int, offsets: np.ndarray, rows: np.ndarray, iov: list[list[memoryview]]
) -> np.ndarray | None:
    """Read rows at byte offsets, each distinct offset once, in file order.

    Warm reads of small rows cost little more than the Python work around each `preadv`,
    so only the `preadv` calls run per row, driven from C by `map` over prepared buffer
    lists; a row asked for twice is read once, then copied.

    Args:
        fd: A file descriptor open for reading.
        offsets: `(N,)` int64 byte offsets of the rows.
        rows: `(N, row_bytes)` uint8 array to read into (`RowBuffers.take`).
        iov: The `preadv` buffers of the rows of `rows`.

    Returns:
        None when every row was read whole, else `(N,)` bool: which rows were cut short
        (the file ends inside them).
    """
    count, size = len(offsets), rows.shape[1]
    order = np.argsort(offsets, kind="stable")  # in file order: kinder to the disk
    in_order = offsets[order]
    repeat = np.zeros(count, dtype=bool)  # a repeated id is read once, then copied
    np.equal(in_order[1:], in_order[:-1], out=repeat[1:])
    repeats = bool(repeat.any())
    targets, starts = (order[~repeat], in_order[~repeat]) if repeats else (order, in_order)
    got = list(
        map(os.preadv, itertools.repeat(fd), map(iov.__getitem__, targets.tolist()),
            starts.tolist())
    )  # fmt: skip
    source = None
    if repeats:
        source = np.maximum.accumulate(np.where(repeat, 0, np.arange(count)))
        rows[order[repeat]] = rows[order[source[repeat]]]
    if got.count(size) == len(got):
        return None
    short = np.zeros(count, dtype=bool)
    short[targets] = np.array(got) != size
    if source is not None:
        short[order[repeat]] = short[order[source[repeat]]]
    return short
