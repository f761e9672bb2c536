"""A memory store in one self-describing HDF5 file, read at the disk's raw speed.

h5py's own reads of scattered rows (fancy indexing) run about 100× slower than the disk on
chunked datasets, fall far behind it for small rows even on contiguous ones, and hold a
process-wide lock. `HDF5Store` therefore keeps every reference's memory in one fixed-size row
of a *contiguous* dataset, asks HDF5 once for the dataset's byte offset, and reads rows with
`os.preadv` on a plain read-only file descriptor: HDF5 describes the file, the operating
system reads it (`benchmarks/store_read.py` measures both).

Layout of the file (all integers little-endian):

| path | what |
|---|---|
| attrs `format`, `format_version` | `"m3.HDF5Store"`, `1` |
| attr `info` | `StoreInfo.to_json()`: memory shape, dtype, writing model's fingerprint… |
| attr `complete` | set by `mark_complete()` after the last write succeeded |
| attr `row_layout` | JSON byte offsets of the fields of a payload row (below) |
| attr `checksum` | `"crc32"` (zlib) |
| `quantizer` | uint8 bytes of the `MemoryQuantizer` (quantized stores only) |
| `payload/000000`, … | uint8 `(rows, row_bytes)` contiguous unfiltered segments (below) |
| `refs/id` | int64 `(slots,)`: the reference id in each slot, −1 for a free slot |
| `refs/doc_id`, `refs/doc_is_int` | document id as a string, and whether it was an int |
| `refs/start`, `refs/end` | int64 token span in the document |
| `refs/tokens` | variable-length int32 token ids |
| `refs/meta_crc` | uint32 crc32 of the slot's id and provenance |

Segments have 64 rows, then twice as many as the previous one, up to `segment_bytes`; slot
`s` is row `s − first slot of its segment` of the segment that holds it. A payload row
holds `keys | values | positions (int16) | valid (uint8) | padding | id (int64) |
magic "M3R1" | crc32 of everything before it`, so one `preadv` reads one reference and its
checksum, and the stored id catches a slot table that points at the wrong row. Keys and
values are the raw bytes of `info.dtype` (bf16 as its 16-bit pattern), or, in a quantized
store, the uint8 codes of a `MemoryQuantizer`, kept whole in the dataset `quantizer` (its
`to_bytes()`, checked against the fingerprint in `info.quantizer`): the file reopens by
itself and reads decode to `info.dtype`.

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

import itertools
import json
import os
import sys
import threading
import weakref
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor

from m3.backends.base import CorruptReferenceError, MemoryStore, StoreInfo, with_quantizer
from m3.backends.in_memory import (
    SlotAllocator,
    SlotMap,
    as_reference_ids,
    check_write,
    missing_error,
    normalise_reference,
)
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer

FORMAT = "m3.HDF5Store"
FORMAT_VERSION = 1
#: "M3R1" read as a little-endian uint32: marks a row that was written (a hole reads zeros)
ROW_MAGIC = int.from_bytes(b"M3R1", "little")
FIRST_SEGMENT_ROWS = 64
DEFAULT_SEGMENT_BYTES = 1 << 30
#: when reads check a row's crc32: every read, the first read of the row in this process (until
#: it is rewritten), or never (the stored id and marker are checked on every read regardless)
VerifyReads = Literal["always", "first", "never"]
#: bytes read at a time by `verify`
_VERIFY_BYTES = 64 << 20
#: h5py handles inherited through fork: kept alive so that the child never closes (and
#: flushes) what belongs to the parent
_INHERITED: list[h5py.File] = []


@dataclass(frozen=True)
class RowLayout:
    """Byte offsets of the fields of one payload row.

    Attributes:
        keys: Offset of the keys, `(L_mem, H_kv, k, d_h)` in the store dtype, or
            `(L_mem, H_kv, k, key code bytes)` uint8 codes in a quantized store.
        values: Offset of the values, likewise (value code bytes when quantized).
        positions: Offset of the selected positions, `(L_mem, H_kv, k)` int16.
        valid: Offset of the validity mask, `(k,)` uint8.
        id: Offset of the reference id, int64.
        magic: Offset of `ROW_MAGIC`, uint32.
        crc: Offset of the crc32 of bytes `[0, crc)`, uint32.
        row_bytes: Size of a row (a multiple of 8, so every field view is aligned).
        memory_bytes: Size of the keys (and of the values, unless a quantized store's
            value codes differ in size: the values end at `positions`).
    """

    keys: int
    values: int
    positions: int
    valid: int
    id: int
    magic: int
    crc: int
    row_bytes: int
    memory_bytes: int

    @classmethod
    def for_info(cls, info: StoreInfo) -> RowLayout:
        """The layout of rows holding memories of `info.memory_shape` in `info.dtype`.

        Args:
            info: The store's description.

        Returns:
            The layout.
        """
        layers, _, heads, tokens, _ = info.memory_shape
        key_bytes, value_bytes = info.vector_bytes
        memory_bytes = layers * heads * tokens * key_bytes
        positions = memory_bytes + layers * heads * tokens * value_bytes
        valid = positions + 2 * layers * heads * tokens
        trailer = -(-(valid + tokens) // 8) * 8
        return cls(
            keys=0,
            values=memory_bytes,
            positions=positions,
            valid=valid,
            id=trailer,
            magic=trailer + 8,
            crc=trailer + 12,
            row_bytes=trailer + 16,
            memory_bytes=memory_bytes,
        )


class _Tables:
    """What a process knows about the file's slots: loaded once, updated by its own writes."""

    def __init__(
        self, slot_ids: np.ndarray, starts: list[int], offsets: list[int], row_bytes: int
    ) -> None:
        self.slot_ids = slot_ids  # (capacity,) id in each slot, −1 free
        self.starts = np.array(starts, dtype=np.int64)  # (S + 1,) first slot of each segment
        self.offsets = np.array(offsets, dtype=np.int64)  # (S,) byte offset of each segment
        self.row_bytes = row_bytes
        # (capacity,) byte offset of each slot's row: one gather per read instead of a
        # searchsorted over the segments (8 B per slot, like `slot_ids`)
        self.slot_offsets = np.zeros(0, dtype=np.int64)
        for first, end, offset in zip(starts[:-1], starts[1:], offsets, strict=True):
            self.add_segment(first, end, offset)
        # (capacity,) bool: crc checked in this process; an array, so that a read of
        # already-checked rows costs one gather whatever the batch size
        self.verified = np.zeros(len(slot_ids), dtype=bool)
        used = slot_ids >= 0
        self.slots = SlotMap()
        self.slots.set(slot_ids[used], np.flatnonzero(used))
        self.allocator = SlotAllocator(used)

    @property
    def capacity(self) -> int:
        return int(self.starts[-1])

    def add_segment(self, first: int, end: int, offset: int) -> None:
        """Append the row offsets of a segment holding slots `[first, end)` at byte `offset`."""
        rows = np.arange(end - first, dtype=np.int64) * self.row_bytes + offset
        self.slot_offsets = np.concatenate([self.slot_offsets, rows])

    def segment_rows(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        segment = np.searchsorted(self.starts, slots, side="right") - 1
        return segment, slots - self.starts[segment]

    def byte_offsets(self, slots: np.ndarray) -> np.ndarray:
        return self.slot_offsets[slots]


def _differing_field(given: StoreInfo, stored: StoreInfo) -> str | None:
    # Compare as JSON, so that tuples that come back from the file as lists still agree.
    a, b = json.loads(given.to_json()), json.loads(stored.to_json())
    return next((name for name in a if a[name] != b.get(name)), None)


def _meta_crc(reference_id: int, reference: Reference) -> int:
    doc_id, start, end, ids = reference
    head = f"{reference_id}\0{type(doc_id).__name__}\0{doc_id}\0{start}\0{end}\0".encode()
    return zlib.crc32(np.asarray(ids, dtype="<i4").tobytes(), zlib.crc32(head))


class HDF5Store(MemoryStore):
    """A memory store in one HDF5 file, read with `os.preadv` at byte offsets.

    The file describes itself (`info` is read from it) and is opened lazily in each
    process: pickling drops open handles, so a store passed to DataLoader workers reopens
    the file in each worker (read-only). Writes flush after every call and leave the file
    consistent between calls; a store is refused in read mode until `mark_complete()`.

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
        self._shared_reader = False  # an unpickled copy of a writable store: no file lock
        self._file: h5py.File | None = None
        self._fd: int | None = None
        self._tables: _Tables | None = None
        self._buffers: list[
            tuple[np.ndarray, list[list[memoryview]], weakref.ref[np.ndarray] | None]
        ] = []
        self._pid = os.getpid()
        self._lock = threading.RLock()
        if mode == "r" and not self.path.exists():
            raise UserError(f"no memory store at {self.path}: the file does not exist")
        if mode == "w" or (mode == "a" and not self.path.exists()):
            if info is None:
                raise UserError(f"creating the store {self.path} needs info=StoreInfo(...)")
            if segment_bytes < 1:
                raise UserError(f"segment_bytes must be positive, got {segment_bytes}")
            self._create(info, segment_bytes)
        else:
            self._open_existing(info, allow_incomplete=allow_incomplete)
            self._open_quantizer(quantizer)

    # ------------------------------------------------------------------------ opening
    def _create(self, info: StoreInfo, segment_bytes: int) -> None:
        self.info = info
        self.layout = RowLayout.for_info(info)
        try:
            file = h5py.File(self.path, "w")
        except OSError as error:
            raise UserError(f"cannot create the store {self.path}: {error}") from error
        file.attrs["format"] = FORMAT
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["info"] = info.to_json()
        file.attrs["complete"] = False
        file.attrs["checksum"] = "crc32"
        file.attrs["row_layout"] = json.dumps(asdict(self.layout))
        file.attrs["max_segment_rows"] = max(1, segment_bytes // self.layout.row_bytes)
        if self.quantizer is not None:
            blob = np.frombuffer(self.quantizer.to_bytes(), dtype=np.uint8)
            file.create_dataset("quantizer", data=blob)
        file.create_group("payload")
        refs = file.create_group("refs")
        # Fixed-size tables carry HDF5's own fletcher32 per chunk; strings and token lists
        # cannot, so meta_crc covers them.
        fixed = {"id": np.int64, "doc_is_int": np.uint8, "start": np.int64, "end": np.int64,
                 "meta_crc": np.uint32}  # fmt: skip
        for name, dtype in fixed.items():
            fill = -1 if name == "id" else 0
            refs.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(4096,),
                                dtype=dtype, fillvalue=fill, fletcher32=True)  # fmt: skip
        refs.create_dataset("doc_id", shape=(0,), maxshape=(None,), chunks=(4096,),
                            dtype=h5py.string_dtype())  # fmt: skip
        refs.create_dataset("tokens", shape=(0,), maxshape=(None,), chunks=(4096,),
                            dtype=h5py.vlen_dtype(np.int32))  # fmt: skip
        file.flush()
        self._file = file

    def _open_existing(self, info: StoreInfo | None, *, allow_incomplete: bool) -> None:
        file = self._open_h5()
        attrs = file.attrs
        if attrs.get("format") != FORMAT:
            file.close()
            raise UserError(f"{self.path} is not an m3 HDF5 memory store (no format={FORMAT!r})")
        if int(attrs["format_version"]) > FORMAT_VERSION:
            file.close()
            raise UserError(
                f"{self.path} has store format {int(attrs['format_version'])}; this m3 reads "
                f"format {FORMAT_VERSION}: upgrade m3"
            )
        stored = StoreInfo.from_json(attrs["info"])
        if info is not None and (name := _differing_field(info, stored)) is not None:
            file.close()
            raise UserError(
                f"{self.path} holds {name}={getattr(stored, name)!r}, but info says "
                f"{getattr(info, name)!r}"
            )
        self.info = stored
        self.layout = RowLayout.for_info(stored)
        if json.loads(attrs["row_layout"]) != asdict(self.layout):
            file.close()
            raise CorruptReferenceError(f"{self.path}: the row layout does not match its info")
        if not self._writable and not allow_incomplete and not bool(attrs["complete"]):
            file.close()
            raise UserError(
                f"{self.path} is an incomplete store (its build never called mark_complete); "
                "resume the build with mode='a', or pass allow_incomplete=True to read it anyway"
            )
        self._file = file

    def _open_quantizer(self, given: MemoryQuantizer | None) -> None:
        """Load the quantizer a quantized file holds; check one given for it."""
        recorded = self.info.quantizer
        if recorded is None:
            if given is not None:
                raise UserError(f"{self.path} holds raw memories: it takes no quantizer")
            return
        from m3.memory.quantize import MemoryQuantizer

        fingerprint = recorded.get("fingerprint")
        if given is not None:
            if given.fingerprint() != fingerprint:
                raise UserError(
                    f"{self.path} was written with quantizer {str(fingerprint)[:16]}, not the "
                    f"given {given.fingerprint()[:16]}"
                )
            return
        try:
            blob = self._h5()["quantizer"][...].tobytes()
        except (KeyError, OSError) as error:
            raise CorruptReferenceError(
                f"{self.path}: the quantizer its info records is missing or damaged ({error})"
            ) from error
        quantizer = MemoryQuantizer.from_bytes(blob)
        if quantizer.fingerprint() != fingerprint:
            raise CorruptReferenceError(
                f"{self.path}: the stored quantizer does not match the fingerprint in its info"
            )
        self.quantizer = quantizer

    def _open_h5(self) -> h5py.File:
        mode = "r+" if self._writable else "r"
        try:
            try:
                return h5py.File(self.path, mode)
            except OSError as error:
                # A copy of a writable store (in a DataLoader worker) reads a file that its
                # parent holds open for writing; the parent flushes after every write.
                if not (self._shared_reader and "lock" in str(error)):
                    raise
                return h5py.File(self.path, mode, locking=False)
        except FileNotFoundError as error:
            raise UserError(f"no memory store at {self.path}: the file does not exist") from error
        except OSError as error:
            text = str(error)
            if "truncated" in text:
                raise CorruptReferenceError(
                    f"{self.path} is truncated: the file is shorter than its contents ({text})"
                ) from error
            if "lock" in text:
                raise UserError(
                    f"{self.path} is open for writing in another process: close it there "
                    f"first ({text})"
                ) from error
            raise UserError(f"cannot open {self.path} as an HDF5 memory store: {text}") from error

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
                self._file = self._open_h5()
            return self._file

    def _read_fd(self) -> int:
        self._own_process()
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def _state(self) -> _Tables:
        self._own_process()
        with self._lock:
            if self._tables is None:
                self._tables = self._load_tables(self._h5())
            return self._tables

    def _load_tables(self, file: h5py.File) -> _Tables:
        try:
            slot_ids = file["refs/id"][...]
        except OSError as error:
            raise CorruptReferenceError(
                f"{self.path}: the slot table is damaged ({error})"
            ) from error
        starts, offsets = [0], []
        for name in sorted(file["payload"]):
            segment = file["payload"][name]
            if segment.chunks is not None or segment.shape[1:] != (self.layout.row_bytes,):
                raise CorruptReferenceError(f"{self.path}: payload/{name} is not a row segment")
            offsets.append(segment.id.get_offset())
            starts.append(starts[-1] + segment.shape[0])
        if len(slot_ids) != starts[-1] or None in offsets:
            raise CorruptReferenceError(
                f"{self.path}: the slot table has {len(slot_ids)} slots but the payload "
                f"segments hold {starts[-1]} rows"
            )
        used = slot_ids[slot_ids >= 0]
        unique, counts = np.unique(used, return_counts=True)
        if (counts > 1).any():
            raise CorruptReferenceError(
                f"{self.path}: reference {int(unique[counts > 1][0])} occupies several slots"
            )
        return _Tables(slot_ids, starts, offsets, self.layout.row_bytes)

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

    def _add_segment(self, file: h5py.File, tables: _Tables) -> None:
        count = len(tables.offsets)
        rows = min(int(file.attrs["max_segment_rows"]), FIRST_SEGMENT_ROWS << min(count, 40))
        # Contiguous, allocated at creation, never filled: one byte offset for all its rows.
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        space = h5py.h5s.create_simple((rows, self.layout.row_bytes))
        name = f"{count:06d}".encode()
        dataset = h5py.h5d.create(file["payload"].id, name, h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl)
        capacity = tables.capacity + rows
        for name in file["refs"]:
            file["refs"][name].resize((capacity,))
        tables.offsets = np.append(tables.offsets, dataset.get_offset())
        tables.add_segment(tables.capacity, capacity, dataset.get_offset())
        tables.starts = np.append(tables.starts, capacity)
        tables.slot_ids = np.concatenate([tables.slot_ids, np.full(rows, -1, dtype=np.int64)])
        tables.verified = np.concatenate([tables.verified, np.zeros(rows, dtype=bool)])

    def _encode_rows(self, ids: np.ndarray, memory: SparseMemory) -> np.ndarray:
        layout, count = self.layout, len(ids)
        positions = memory.positions.detach().cpu()
        out_of_range = (positions < -1) | (positions > np.iinfo(np.int16).max)
        if out_of_range.any():
            row = int(out_of_range.flatten(1).any(1).nonzero()[0, 0])
            raise UserError(
                f"{self.path}: reference {int(ids[row])} has a selected position outside "
                "-1..32767, which int16 storage cannot hold"
            )
        rows = np.zeros((count, layout.row_bytes), dtype=np.uint8)

        def raw(tensor: Tensor) -> np.ndarray:
            return tensor.detach().contiguous().view(torch.uint8).reshape(count, -1).numpy()

        if self.quantizer is not None:
            codes = self.quantizer.encode(memory)
            keys, values = codes.keys.cpu(), codes.values.cpu()
        else:
            dtype = self.info.torch_dtype
            keys, values = memory.keys.to("cpu", dtype), memory.values.to("cpu", dtype)
        rows[:, layout.keys : layout.values] = raw(keys)
        rows[:, layout.values : layout.positions] = raw(values)
        rows[:, layout.positions : layout.valid] = raw(positions.to(torch.int16))
        tokens = memory.valid.shape[1]
        rows[:, layout.valid : layout.valid + tokens] = memory.valid.cpu().numpy()
        rows[:, layout.id : layout.magic] = ids.astype("<i8").view(np.uint8).reshape(count, 8)
        rows[:, layout.magic : layout.crc] = np.frombuffer(
            ROW_MAGIC.to_bytes(4, "little"), np.uint8
        )
        crcs = np.fromiter((zlib.crc32(row[: layout.crc]) for row in rows), np.uint32, count)
        rows[:, layout.crc :] = crcs.astype("<u4").view(np.uint8).reshape(count, 4)
        return rows

    def _write_rows(
        self, file: h5py.File, tables: _Tables, slots: np.ndarray, rows: np.ndarray
    ) -> None:
        segments, within = tables.segment_rows(slots)
        order = np.lexsort((within, segments))
        # Runs of consecutive rows of one segment become one hyperslab write each.
        breaks = np.flatnonzero(
            (np.diff(segments[order]) != 0) | (np.diff(within[order]) != 1)
        ) + 1  # fmt: skip
        for run in np.split(order, breaks):
            segment = file["payload"][f"{int(segments[run[0]]):06d}"]
            first = int(within[run[0]])
            segment[first : first + len(run)] = rows[run]

    def _write_meta(
        self, file: h5py.File, slots: np.ndarray, ids: np.ndarray, references: list[Reference]
    ) -> None:
        order = np.argsort(slots)
        where: np.ndarray | slice = slots[order]
        if where[-1] - where[0] == len(where) - 1:
            where = slice(int(where[0]), int(where[-1]) + 1)  # one hyperslab, not a point list
        picked = [references[i] for i in order.tolist()]
        tokens = np.empty(len(picked), dtype=object)
        for i, reference in enumerate(picked):
            tokens[i] = np.asarray(reference.ids, dtype=np.int32)
        refs = file["refs"]
        refs["doc_id"][where] = [str(r.doc_id) for r in picked]
        refs["doc_is_int"][where] = np.array(
            [not isinstance(r.doc_id, str) for r in picked], np.uint8
        )
        refs["start"][where] = np.array([r.start for r in picked], np.int64)
        refs["end"][where] = np.array([r.end for r in picked], np.int64)
        # write_direct: `ds[where] = tokens` misreads equally long token lists as a 2-D array
        refs["tokens"].write_direct(tokens, dest_sel=np.s_[where])
        crcs = [_meta_crc(int(ids[i]), references[i]) for i in order.tolist()]
        refs["meta_crc"][where] = np.array(crcs, np.uint32)
        # The slot table entry last: until it is written the slot still reads as free.
        refs["id"][where] = ids[order]

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
        rows = self._encode_rows(array, memory)
        tables = self._state()
        with self._writing() as file:
            slots = tables.slots.get(array)
            new = slots < 0
            slots[new] = tables.allocator.take(int(new.sum()))
            while tables.allocator.end > tables.capacity:
                self._add_segment(file, tables)
            self._write_rows(file, tables, slots, rows)
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

    def _row_buffer(self, count: int) -> tuple[np.ndarray, list[list[memoryview]]]:
        """A `(count, row_bytes)` array to read into, and the `preadv` buffers of its rows.

        The array is a previous read's once nothing uses it: fresh buffers cost page faults
        (about a third of a warm read of large rows). Each read gets a new view of a kept
        buffer, and the buffer is reused only after that view (and so every tensor made
        from it) is gone. Two buffers are kept, each with its per-row buffer lists
        (`[memoryview of row j]`) made once: the read loop then makes no Python object per
        row.
        """
        with self._lock:
            free = [
                i
                for i, (buffer, _, view) in enumerate(self._buffers)
                if buffer.shape[0] >= count and (view is None or view() is None)
            ]
            if free:
                i = free[0]
                buffer, iov, _ = self._buffers[i]
            else:
                buffer = np.empty((count, self.layout.row_bytes), dtype=np.uint8)
                flat, size = memoryview(buffer.reshape(-1)), self.layout.row_bytes
                iov = [[flat[j * size : (j + 1) * size]] for j in range(count)]
                self._buffers = [*self._buffers[-1:], (buffer, iov, None)]
                i = len(self._buffers) - 1
            rows = buffer[:count]
            self._buffers[i] = (buffer, iov, weakref.ref(rows))
            return rows, iov

    def _read_rows(
        self, ids: np.ndarray, slots: np.ndarray, *, check: VerifyReads
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of slots, `(N, row_bytes)` uint8, and `(N,)` bool: which ones are damaged.

        Warm reads of small rows cost little more than the Python work around each
        `preadv`, so only the `preadv` calls run per row, driven from C by `map` over
        prepared buffer lists; the id, marker and "already verified" checks run on
        whole-batch numpy views of the row layout.
        """
        layout, count, size = self.layout, len(ids), self.layout.row_bytes
        tables = self._state()
        offsets = tables.slot_offsets[slots]
        fd = self._read_fd()
        rows, iov = self._row_buffer(count)
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
        if repeats:
            source = np.maximum.accumulate(np.where(repeat, 0, np.arange(count)))
            rows[order[repeat]] = rows[order[source[repeat]]]
        # Rows are a whole number of 8-byte words, so each trailer field is one column of
        # an integer view of the batch (no copies).
        stored_id = rows.view("<i8")[:, layout.id // 8]
        magic = rows.view("<u4")[:, layout.magic // 4]
        bad = (stored_id != ids) | (magic != ROW_MAGIC)
        if got.count(size) != len(got):  # a short read: the file ends inside the row
            short = np.zeros(count, dtype=bool)
            short[targets] = np.array(got) != size
            if repeats:
                short[order[repeat]] = short[order[source[repeat]]]
            bad |= short
        # Rows to checksum: every sound one ("always"), or those not yet checked in this
        # process ("first": one gather from the `verified` array, nothing more once all are).
        if check == "never":
            return rows, bad
        needed = ~bad if check == "always" else ~(bad | tables.verified[slots])
        if needed.any():
            which = np.flatnonzero(needed)
            stored = rows.view("<u4")[which, layout.crc // 4]
            body = rows[:, : layout.crc]
            crcs = np.fromiter((zlib.crc32(body[j]) for j in which.tolist()), np.uint32, len(which))
            bad[which] = crcs != stored
            tables.verified[slots[which[crcs == stored]]] = True
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
        return self._decode(rows)

    def _decode(self, rows: np.ndarray) -> SparseMemory:
        layout, count = self.layout, rows.shape[0]
        layers, _, heads, tokens, dim = self.info.memory_shape
        dtype = self.info.torch_dtype
        if count == 0:  # torch cannot reinterpret the bytes of an empty, stride-0 view
            empty = torch.zeros((0, layers, heads, tokens, dim), dtype=dtype)
            positions = torch.zeros((0, layers, heads, tokens), dtype=torch.long)
            return SparseMemory(
                empty, empty.clone(), torch.zeros((0, tokens), dtype=torch.bool), positions
            )
        # Positions (long) and valid (bool) are copies anyway: made in numpy, whose calls
        # cost less than torch's at this size.
        positions = rows[:, layout.positions : layout.valid].view("<i2").astype(np.int64)
        valid = torch.from_numpy(rows[:, layout.valid : layout.valid + tokens] != 0)
        positions_tensor = torch.from_numpy(positions).view(count, layers, heads, tokens)
        if self.quantizer is not None:
            return self._decode_codes(rows, valid, positions_tensor)
        # Tensors made from `rows` itself keep it alive, which is what frees its buffer for
        # reuse only once they are gone (numpy views would point at the buffer instead).
        typed, size = torch.from_numpy(rows).view(dtype), dtype.itemsize
        memory_shape = (count, layers, heads, tokens, dim)
        memory_strides = (layout.row_bytes // size, heads * tokens * dim, tokens * dim, dim, 1)
        keys = typed.as_strided(memory_shape, memory_strides, layout.keys // size)
        values = typed.as_strided(memory_shape, memory_strides, layout.values // size)
        return SparseMemory(keys, values, valid, positions_tensor)

    def _decode_codes(self, rows: np.ndarray, valid: Tensor, positions: Tensor) -> SparseMemory:
        """Decode the key and value codes of `(N, row_bytes)` rows to `info.dtype`."""
        from m3.memory.quantize import QuantizedMemory

        assert self.quantizer is not None
        layout, count = self.layout, rows.shape[0]
        layers, _, heads, tokens, _ = self.info.memory_shape
        key_bytes, value_bytes = self.info.vector_bytes
        raw = torch.from_numpy(rows)

        def codes(offset: int, width: int) -> Tensor:
            shape = (count, layers, heads, tokens, width)
            strides = (layout.row_bytes, heads * tokens * width, tokens * width, width, 1)
            return raw.as_strided(shape, strides, offset)

        quantized = QuantizedMemory(
            codes(layout.keys, key_bytes), codes(layout.values, value_bytes), valid, positions
        )
        return self.quantizer.decode(quantized, dtype=self.info.torch_dtype)

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
            if _meta_crc(reference_id, reference) != crc:
                raise CorruptReferenceError(
                    f"{self.path}: the provenance of reference {reference_id} is damaged"
                )
            out.append(reference)
        return out

    def _read_meta(self, slots: np.ndarray) -> list[tuple[Reference, int]]:
        """Provenance and its stored crc for sorted, distinct slots."""
        if len(slots) == 0:
            return []
        refs = self._h5()["refs"]
        where = slots
        if slots[-1] - slots[0] == len(slots) - 1:
            where = slice(int(slots[0]), int(slots[-1]) + 1)
        try:
            doc_ids = refs["doc_id"].asstr()[where]
            is_int, starts, ends = (
                refs["doc_is_int"][where],
                refs["start"][where],
                refs["end"][where],
            )
            tokens, crcs = refs["tokens"][where], refs["meta_crc"][where]
        except OSError as error:
            raise CorruptReferenceError(f"{self.path}: provenance is damaged ({error})") from error
        out = []
        for i in range(len(slots)):
            doc_id: str | int = int(doc_ids[i]) if is_int[i] else str(doc_ids[i])
            reference = Reference(doc_id, int(starts[i]), int(ends[i]), tuple(tokens[i].tolist()))
            out.append((reference, int(crcs[i])))
        return out

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
                if _meta_crc(reference_id, reference) != crc:
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
        self._file, self._fd, self._tables = None, None, None
        self._buffers = []
        self._pid = os.getpid()
        self._lock = threading.RLock()

    def __del__(self) -> None:
        # Only this process's descriptor; h5py closes its own handle when collected. At
        # interpreter exit `os` may already be gone, hence the blanket suppress.
        with suppress(Exception):
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
                self._fd = None

    def __repr__(self) -> str:
        mode = "a" if self._writable else "r"
        quantized = ", quantized" if self.quantizer is not None else ""
        return (
            f"HDF5Store({str(self.path)!r}, mode={mode!r}, "
            f"memory_shape={self.info.memory_shape}{quantized})"
        )
