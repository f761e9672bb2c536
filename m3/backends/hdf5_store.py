"""A memory store in one self-describing HDF5 file, read at the disk's raw speed.

`HDF5Store` keeps every reference's memory in one fixed-size row of a *contiguous* dataset,
asks HDF5 once for the dataset's byte offset, and reads rows with `os.preadv` on a plain
read-only file descriptor: HDF5 describes the file, the operating system reads it. The file
layout and the row format are described in `m3.backends.hdf5_layout`; the h5py side
(creating, opening, slot tables, writes) is `m3.backends.hdf5_file`; the `preadv` read loop
is `m3.backends.hdf5_reader`.

```python
with HDF5Store("bank.h5", info=info, mode="w") as store:
    store.write(ids, memory, references)
    store.mark_complete()
store = HDF5Store("bank.h5")                      # read-only; refuses an incomplete file
store.check_model(config.memory_shape, model.memory_fingerprint())
memory = store.read(torch.tensor([7, 3, 7]))

quantizer = MemoryQuantizer(ProductQuantizer(info.memory_shape[4])).fit(sample)
with HDF5Store("small.h5", info=info, mode="w", quantizer=quantizer) as store:
    store.write(ids, memory, references)  # keeps codes: decoded floats come back
    store.mark_complete()
```
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor

from m3.backends.base import CorruptReferenceError, MemoryStore, StoreInfo, with_quantizer
from m3.backends.checks import as_reference_ids, check_write, missing_error, normalise_reference
from m3.backends.hdf5_file import (
    SlotTables,
    add_segment,
    check_header,
    create_file,
    load_tables,
    open_file,
    read_meta,
    read_quantizer,
    write_meta,
    write_rows,
)
from m3.backends.hdf5_layout import (
    DEFAULT_SEGMENT_BYTES,
    RowLayout,
    decode_rows,
    encode_rows,
    meta_crc,
)
from m3.backends.hdf5_reader import RowBuffers, read_rows
from m3.backends.hdf5_salvage import (
    begin_writing,
    end_writing,
    interrupted_writer,
    refuse_interrupted,
    salvage,
)
from m3.core.checks import check_int
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer

#: when reads check a row's crc32: every read, the first read of the row in this process (until
#: it is rewritten), or never (the stored id and marker are checked on every read regardless)
VerifyReads = Literal["always", "first", "never"]
#: bytes read at a time by `verify`
_VERIFY_BYTES = 64 << 20
#: h5py handles inherited through fork: kept alive so that the child never closes (and
#: flushes) what belongs to the parent
_INHERITED: list[h5py.File] = []


class HDF5Store(MemoryStore):
    """A memory store in one HDF5 file, read with `os.preadv` at byte offsets.

    The file describes itself (`info` is read from it) and is opened lazily in each
    process: pickling drops open handles, so a store passed to DataLoader workers reopens
    the file in each worker (read-only). Writes flush after every call and leave the file
    consistent between calls; a store is refused in read mode until `mark_complete()`. A
    writer leaves `<file>.writing` until it closes the file cleanly: a file whose writer
    died is refused to readers and salvaged by the next writer (`m3.backends.hdf5_salvage`).

    Reads return keys and values `(N, L_mem, H_kv, k, d_h)` as views into one buffer of
    whole rows (not contiguous across references; `.contiguous()` copies them). A later
    read reuses that buffer only once no tensor of the earlier result is left.

    A quantized store (created with `quantizer=`) keeps each key and value vector as its
    code, on the same read path (one `preadv` per row), and returns `quantizer.decode` of
    the codes in `info.dtype`: exactly `quantizer.decode(quantizer.encode(memory))` of what
    was written, so its error is the quantizer's own reconstruction error.

    Attributes:
        path: The file.
        info: What the store holds, read from the file.
        layout: Byte offsets of the fields of a payload row.
        verify_reads: When reads check crc32s (see Args).
        quantizer: The trained quantizer of a quantized store (read from the file when
            reopened), or None for raw keys and values.

    Args:
        path: The file.
        info: What the store holds; needed to create a file, and when given for an
            existing file it must equal the file's own.
        mode: "r" to read, "a" to read and write (creating the file if it is missing),
            "w" to create or overwrite.
        allow_incomplete: Open in read mode a store that was never marked complete (e.g.
            to inspect an interrupted build).
        verify_reads: When reads check a row's crc32 (which catches flipped bits): "always";
            "first", the first time this process reads the row (again after the row is
            rewritten); or "never". Every read checks the row's stored id and marker
            regardless, which catches holes, truncation and misdirected rows. crc32 runs
            at ~2–4 GB/s, about as long as reading the row from the page cache, so "always"
            halves or thirds warm reads (`benchmarks/store_read.py`); "first" pays it once
            per row and process. `verify()` always checks everything.
        segment_bytes: Largest payload segment, in bytes; used when the file is created (an
            existing store keeps its own).
        quantizer: A trained `MemoryQuantizer`: the store keeps codes and decodes on read.
            Needed to create a quantized file only; an existing one reopens with the
            quantizer it holds, and one given for it must be the same (same fingerprint).

    Raises:
        UserError: For a bad mode, a missing file in read mode, creating without `info`,
            an `info` that disagrees with the file's, an incomplete store in read mode, or a
            file that is not an m3 store; an untrained quantizer, or one that is not the
            file's.
        CorruptReferenceError: For a truncated or damaged file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        info: StoreInfo | None = None,
        mode: Literal["r", "a", "w"] = "r",
        allow_incomplete: bool = False,
        verify_reads: VerifyReads = "first",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        quantizer: MemoryQuantizer | None = None,
    ) -> None:
        if mode not in ("r", "a", "w"):
            raise UserError(f"HDF5Store mode must be 'r', 'a' or 'w', got {mode!r}")
        if verify_reads not in ("always", "first", "never"):
            raise UserError(
                f"verify_reads must be 'always', 'first' or 'never', got {verify_reads!r}"
            )
        if sys.byteorder != "little":
            raise UserError("HDF5Store reads raw little-endian bytes: this host is big-endian")
        self.path = Path(path)
        self.verify_reads = verify_reads
        self.quantizer = quantizer
        if info is not None:
            info = with_quantizer(info, quantizer, where=str(self.path))
        self._writable = mode != "r"
        self._synced = False  # synced to disk since the last write (mark_complete)
        self._shared_reader = False  # an unpickled copy of a writable store: no file lock
        self._file: h5py.File | None = None
        self._fd: int | None = None
        self._tables: SlotTables | None = None
        self._buffers = RowBuffers()
        self._pid = os.getpid()
        self._lock = threading.RLock()
        if mode == "r" and not self.path.exists():
            raise UserError(f"no memory store at {self.path}: the file does not exist")
        if mode == "r" and not allow_incomplete:
            refuse_interrupted(self.path)
        creating = mode == "w" or (mode == "a" and not self.path.exists())
        if creating and info is None:
            raise UserError(f"creating the store {self.path} needs info=StoreInfo(...)")
        if creating:
            segment_bytes = check_int("HDF5Store", "segment_bytes", segment_bytes, low=1)
        if mode == "a" and not creating and interrupted_writer(self.path) is not None:
            kept, lost = salvage(self.path, info=info, quantizer=quantizer)
            print(
                f"m3: {self.path} was being written when its writer stopped: kept the "
                f"{kept} references that pass their checks, dropped {lost}",
                file=sys.stderr,
            )
        if self._writable:
            begin_writing(self.path)  # before the first byte changes; removed by close()
        try:
            if creating:
                self._create(info, segment_bytes)
            else:
                self._open_existing(info, allow_incomplete=allow_incomplete)
                self._open_quantizer(quantizer)
        except BaseException:
            if self._writable:
                end_writing(self.path)
            raise

    # ------------------------------------------------------------------------ opening
    def _create(self, info: StoreInfo, segment_bytes: int) -> None:
        self.info = info
        self.layout = RowLayout.for_info(info)
        self._file = create_file(
            self.path, info, self.layout, segment_bytes=segment_bytes, quantizer=self.quantizer
        )

    def _open_existing(self, info: StoreInfo | None, *, allow_incomplete: bool) -> None:
        file = self._open_h5()
        self.info = check_header(
            file, self.path, info, writable=self._writable, allow_incomplete=allow_incomplete
        )
        self.layout = RowLayout.for_info(self.info)
        self._file = file

    def _open_quantizer(self, given: MemoryQuantizer | None) -> None:
        """Load the quantizer a quantized file holds; check one given for it."""
        self.quantizer = read_quantizer(self._h5(), self.path, self.info, given)

    def _open_h5(self) -> h5py.File:
        # A copy of a writable store (in a DataLoader worker) reads a file that its parent
        # holds open for writing; the parent flushes after every write.
        return open_file(self.path, writable=self._writable, shared_reader=self._shared_reader)

    def _own_process(self) -> None:
        # After fork, handles belong to the parent: forget them (never close or flush them
        # here) and reopen. The inherited tables stay valid for reading.
        if self._pid == os.getpid():
            return
        if self._file is not None:
            _INHERITED.append(self._file)
        if self._fd is not None:
            os.close(self._fd)  # closes only this process's copy of the descriptor
        self._file, self._fd, self._pid = None, None, os.getpid()
        self._lock = threading.RLock()
        if self._writable:
            self._writable, self._shared_reader = False, True

    def _h5(self) -> h5py.File:
        self._own_process()
        with self._lock:
            if self._file is None:
                if self._writable:
                    begin_writing(self.path)  # reopened after close(): mark it again
                self._file = self._open_h5()
            return self._file

    def _read_fd(self) -> int:
        self._own_process()
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def _state(self) -> SlotTables:
        self._own_process()
        with self._lock:
            if self._tables is None:
                self._tables = load_tables(self._h5(), self.path, self.layout.row_bytes)
            return self._tables

    # ------------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        self._own_process()
        if not self._writable:
            raise UserError(
                f"{self.path} is open read-only: open it with mode='a' to write "
                "(an unpickled or forked copy of a store is always read-only)"
            )

    @contextmanager
    def _writing(self) -> Iterator[h5py.File]:
        # A batch that fails midway leaves a complete store marked incomplete, and the
        # in-process tables are reloaded from the file next time.
        file = self._h5()
        self._synced = False
        was_complete = bool(file.attrs["complete"])
        if was_complete:
            file.attrs["complete"] = False
            file.flush()
        try:
            yield file
        except BaseException:
            self._tables = None
            raise
        if was_complete:
            file.attrs["complete"] = True
        file.flush()

    def _write_meta(
        self, file: h5py.File, slots: np.ndarray, ids: np.ndarray, references: list[Reference]
    ) -> None:
        # The slot table entry last: until it is written the slot still reads as free.
        write_meta(file, slots, ids, references)

    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Add references, or overwrite the ones whose ids are already stored (in place).

        Each call writes payload rows, then provenance, then the slot table entries, then
        flushes: an interrupted call leaves new ids absent and a complete store marked
        incomplete; an interrupted overwrite leaves rows that fail their checksum.

        Args:
            ids: `(N,)` int64 reference ids (distinct, ≥ 0).
            memory: Their sparse memories: keys and values `(N, L_mem, H_kv, k, d_h)` (cast
                to `info.dtype`), valid `(N, k)`, positions `(N, L_mem, H_kv, k)` in −1..32767.
            references: Their token ids (int32) and provenance, in the same order.

        Raises:
            UserError: For a read-only store or malformed input; nothing is written then.
        """
        self._check_writable()
        array = check_write(self.info, ids, memory, references, where=str(self.path))
        normalised = [normalise_reference(r) for r in references]
        for reference_id, reference in zip(array.tolist(), normalised, strict=True):
            if reference.ids and not (-(2**31) <= min(reference.ids) <= max(reference.ids) < 2**31):
                raise UserError(
                    f"{self.path}: reference {reference_id} has token ids outside int32"
                )
        if len(array) == 0:
            return
        where = str(self.path)
        rows = encode_rows(self.layout, self.info, self.quantizer, array, memory, where=where)
        tables = self._state()
        with self._writing() as file:
            slots = tables.slots.get(array)
            new = slots < 0
            slots[new] = tables.allocator.take(int(new.sum()))
            while tables.allocator.end > tables.capacity:
                add_segment(file, tables)
            write_rows(file, tables, slots, rows)
            self._write_meta(file, slots, array, normalised)
        tables.slot_ids[slots] = array
        tables.verified[slots] = False
        tables.slots.set(array[new], slots[new])

    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Remove references; their slots are reused by later writes.

        Args:
            ids: `(N,)` reference ids; each must be stored.

        Raises:
            MissingReferenceError: For an id that is not stored (nothing is deleted then).
            UserError: For a read-only store.
        """
        self._check_writable()
        array, slots = self._find(ids)
        array, first = np.unique(array, return_index=True)
        slots = slots[first]
        tables = self._state()
        with self._writing() as file:
            order = np.argsort(slots)
            file["refs/id"][slots[order]] = -1
        tables.slot_ids[slots] = -1
        tables.verified[slots] = False
        tables.slots.remove(array)
        tables.allocator.give_back(slots)

    def mark_complete(self) -> None:
        """Record that the store is whole: flush, sync to disk, then set the `complete` flag.

        Raises:
            UserError: For a read-only store.
        """
        self._check_writable()
        file = self._h5()
        file.flush()
        self._sync()
        file.attrs["complete"] = True
        file.flush()
        self._sync()
        self._synced = True

    def _sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # syncs the file's dirty pages whichever descriptor wrote them
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------ reading
    def _find(self, ids: Sequence[int] | Tensor) -> tuple[np.ndarray, np.ndarray]:
        array = as_reference_ids(ids, where=str(self.path))
        slots = self._state().slots.get(array)
        if (slots < 0).any():
            raise missing_error(array, slots, where=str(self.path))
        return array, slots

    def _read_rows(
        self, ids: np.ndarray, slots: np.ndarray, *, check: VerifyReads
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of slots, `(N, row_bytes)` uint8, and `(N,)` bool: which ones are damaged.

        The id, marker and "already verified" checks run on whole-batch numpy views of the
        row layout; only the `preadv` calls (`read_rows`) and crc32s run per row.
        """
        layout, tables = self.layout, self._state()
        offsets = tables.slot_offsets[slots]
        fd = self._read_fd()
        with self._lock:
            rows, iov = self._buffers.take(len(ids), layout.row_bytes)
        short = read_rows(fd, offsets, rows, iov)
        bad = layout.misplaced(rows, ids)
        if short is not None:  # the file ends inside a row
            bad |= short
        # Rows to checksum: every sound one ("always"), or those not yet checked in this
        # process ("first": one gather from the `verified` array, nothing more once all are).
        if check == "never":
            return rows, bad
        needed = ~bad if check == "always" else ~(bad | tables.verified[slots])
        if needed.any():
            which = np.flatnonzero(needed)
            sound = layout.crc_ok(rows, which)
            bad[which] = ~sound
            tables.verified[slots[which[sound]]] = True
        return rows, bad

    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories: one `preadv` per distinct reference, in file order.

        Args:
            ids: `(N,)` reference ids, repeats allowed.

        Returns:
            Their sparse memories in the order of `ids`: keys and values
            `(N, L_mem, H_kv, k, d_h)` in `info.torch_dtype` (views into one buffer of rows),
            valid `(N, k)`, positions `(N, L_mem, H_kv, k)`.

        Raises:
            MissingReferenceError: For an id that is not stored.
            CorruptReferenceError: Naming the ids whose rows are damaged or cut off.
        """
        array, slots = self._find(ids)
        rows, bad = self._read_rows(array, slots, check=self.verify_reads)
        if bad.any():
            damaged = np.unique(array[bad])
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise CorruptReferenceError(
                f"{self.path}: reference {int(damaged[0])}{more} is damaged: its stored bytes "
                "fail their check (a damaged or truncated file); run verify() to list all"
            )
        return decode_rows(self.layout, self.info, self.quantizer, rows)

    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references (read through h5py: not a hot path).

        Args:
            ids: `(N,)` reference ids.

        Returns:
            One `Reference` per id, in order.

        Raises:
            MissingReferenceError: For an id that is not stored.
            CorruptReferenceError: When stored provenance fails its checksum.
        """
        array, slots = self._find(ids)
        unique, inverse = np.unique(slots, return_inverse=True)
        found = self._read_meta(unique)
        out = []
        for reference_id, position in zip(array.tolist(), inverse.tolist(), strict=True):
            reference, crc = found[position]
            if meta_crc(reference_id, reference) != crc:
                raise CorruptReferenceError(
                    f"{self.path}: the provenance of reference {reference_id} is damaged"
                )
            out.append(reference)
        return out

    def _read_meta(self, slots: np.ndarray) -> list[tuple[Reference, int]]:
        """Provenance and its stored crc for sorted, distinct slots."""
        return read_meta(self._h5(), slots, self.path)

    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check stored rows and provenance against their checksums.

        Args:
            ids: References to check; all when None.

        Returns:
            The ids whose bytes are damaged (empty when all is well), ascending.

        Raises:
            MissingReferenceError: For an id that is not stored.
        """
        if ids is None:
            array = self._state().slots.ids()
            slots = self._state().slots.get(array)
        else:
            array, slots = self._find(ids)
            array, first = np.unique(array, return_index=True)
            slots = slots[first]
        damaged: set[int] = set()
        step = max(1, _VERIFY_BYTES // self.layout.row_bytes)
        for start in range(0, len(array), step):
            part, part_slots = array[start : start + step], slots[start : start + step]
            _, bad = self._read_rows(part, part_slots, check="always")
            damaged.update(part[bad].tolist())
            order = np.argsort(part_slots)
            try:
                found = self._read_meta(part_slots[order])
            except CorruptReferenceError:
                damaged.update(part.tolist())
                continue
            for reference_id, (reference, crc) in zip(part[order].tolist(), found, strict=True):
                if meta_crc(reference_id, reference) != crc:
                    damaged.add(reference_id)
        return sorted(damaged)

    def ids(self) -> Tensor:
        """All stored reference ids, `(N,)` int64, ascending."""
        return torch.from_numpy(self._state().slots.ids())

    def __len__(self) -> int:
        return len(self._state().slots)

    def __contains__(self, reference_id: object) -> bool:
        if isinstance(reference_id, bool) or not isinstance(reference_id, (int, np.integer)):
            return False
        return bool(self._state().slots.get(np.array([reference_id], dtype=np.int64))[0] >= 0)

    # ------------------------------------------------------------------------ the rest
    @property
    def complete(self) -> bool:
        """Whether `mark_complete()` was called after the last write."""
        return bool(self._h5().attrs["complete"])

    def check_model(self, memory_shape: tuple[int, ...], fingerprint: str) -> None:
        """Refuse to serve a model of another memory shape or other weights.

        Args:
            memory_shape: The model's `Config.memory_shape`, `(L_mem, 2, H_kv, k, d_h)`.
            fingerprint: The model's `memory_fingerprint()`.

        Raises:
            UserError: Naming the differing dimension, or both fingerprints.
        """
        self.info.check_model(memory_shape, fingerprint, where=str(self.path))

    def row_location(self, reference_id: int) -> tuple[int, int]:
        """Where a reference's payload row lies in the file.

        Args:
            reference_id: A stored reference id.

        Returns:
            `(byte offset, row_bytes)`.

        Raises:
            MissingReferenceError: For an id that is not stored.
        """
        _, slots = self._find([reference_id])
        return int(self._state().byte_offsets(slots)[0]), self.layout.row_bytes

    def close(self) -> None:
        """Close the file; the store reopens it lazily when used again."""
        if self._pid == os.getpid():
            if self._file is not None:
                self._file.close()
                if self._writable:  # the file is whole on disk: no salvage needed
                    end_writing(self.path, synced=self._synced)
            if self._fd is not None:
                os.close(self._fd)
        self._file, self._fd, self._tables = None, None, None

    def __enter__(self) -> HDF5Store:
        return self

    def __getstate__(self) -> dict[str, Any]:
        # No handles, descriptors or tables: the copy reopens the file lazily, read-only.
        return {
            "path": self.path,
            "info": self.info,
            "layout": self.layout,
            "verify_reads": self.verify_reads,
            "shared_reader": self._writable or self._shared_reader,
            "quantizer": self.quantizer,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.info, self.layout = state["path"], state["info"], state["layout"]
        self.verify_reads = state["verify_reads"]
        self.quantizer = state.get("quantizer")
        self._writable, self._shared_reader = False, state["shared_reader"]
        self._synced = False
        self._file, self._fd, self._tables = None, None, None
        self._buffers = RowBuffers()
        self._pid = os.getpid()
        self._lock = threading.RLock()

    def __del__(self) -> None:
        # Only this process's handles; a writer is closed as close() does (synced, its
        # marker removed). At interpreter exit `os` may already be gone: the blanket suppress.
        with suppress(Exception):
            if self._pid == os.getpid() and (self._fd is not None or self._writable):
                self.close()  # a writer dropped without close() still leaves a clean file

    def __repr__(self) -> str:
        mode = "a" if self._writable else "r"
        quantized = ", quantized" if self.quantizer is not None else ""
        return (
            f"HDF5Store({str(self.path)!r}, mode={mode!r}, "
            f"memory_shape={self.info.memory_shape}{quantized})"
        )
