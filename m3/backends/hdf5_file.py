"""The HDF5 side of an `HDF5Store` file: creating, opening, the slot tables, writes through h5py.

`m3.backends.hdf5_layout` says what the file holds; this module makes and reads it with
h5py: `create_file` lays out a new file, `open_file` and `check_header` open an existing
one and refuse what is not a sound m3 store, `read_quantizer` loads the quantizer a
quantized file keeps, `load_tables` reads the slot table into a `SlotTables`, and
`add_segment`, `write_rows`, `write_meta` and `read_meta` write and read payload rows and
provenance. Hot reads do not pass through here: the store reads rows with `os.preadv` at
the byte offsets `SlotTables` knows (`m3.backends.hdf5_reader`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from m3.backends.base import CorruptReferenceError, StoreInfo
from m3.backends.hdf5_layout import (
    FIRST_SEGMENT_ROWS,
    FORMAT,
    FORMAT_VERSION,
    RowLayout,
    meta_crc,
)
from m3.backends.slots import SlotAllocator, SlotMap
from m3.core.errors import UserError
from m3.core.references import Reference

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer


class SlotTables:
    """What a process knows about the file's slots: loaded once, updated by its own writes.

    Args:
        slot_ids: `(capacity,)` int64 id in each slot, −1 for a free one.
        starts: `S + 1` first slots of the `S` payload segments, and the capacity.
        offsets: `S` byte offsets of the segments in the file.
        row_bytes: Size of a payload row.

    Attributes:
        slot_ids: `(capacity,)` int64 id in each slot, −1 for a free one.
        starts: `(S + 1,)` int64 first slot of each segment, then the capacity.
        offsets: `(S,)` int64 byte offset of each segment.
        slot_offsets: `(capacity,)` int64 byte offset of each slot's row: one gather per
            read instead of a search over the segments (8 B per slot, like `slot_ids`).
        verified: `(capacity,)` bool: rows whose crc32 this process checked; an array, so
            that a read of already checked rows costs one gather whatever the batch size.
        slots: Id -> slot.
        allocator: Which slots are free.
    """

    def __init__(
        self, slot_ids: np.ndarray, starts: list[int], offsets: list[int], row_bytes: int
    ) -> None:
        self.slot_ids = slot_ids
        self.starts = np.array(starts, dtype=np.int64)
        self.offsets = np.array(offsets, dtype=np.int64)
        self.row_bytes = row_bytes
        self.slot_offsets = np.zeros(0, dtype=np.int64)
        for first, end, offset in zip(starts[:-1], starts[1:], offsets, strict=True):
            self.add_offsets(first, end, offset)
        self.verified = np.zeros(len(slot_ids), dtype=bool)
        used = slot_ids >= 0
        self.slots = SlotMap()
        self.slots.set(slot_ids[used], np.flatnonzero(used))
        self.allocator = SlotAllocator(used)

    @property
    def capacity(self) -> int:
        """Slots in all segments together."""
        return int(self.starts[-1])

    def add_offsets(self, first: int, end: int, offset: int) -> None:
        """Append the row offsets of a new segment.

        Args:
            first: Its first slot.
            end: One past its last slot.
            offset: Its byte offset in the file.
        """
        rows = np.arange(end - first, dtype=np.int64) * self.row_bytes + offset
        self.slot_offsets = np.concatenate([self.slot_offsets, rows])

    def segment_rows(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where slots lie in the payload segments.

        Args:
            slots: `(N,)` int64 slots.

        Returns:
            The segment of each slot and its row within that segment, `(N,)` int64 each.
        """
        segment = np.searchsorted(self.starts, slots, side="right") - 1
        return segment, slots - self.starts[segment]

    def byte_offsets(self, slots: np.ndarray) -> np.ndarray:
        """Where the rows of slots lie in the file.

        Args:
            slots: `(N,)` int64 slots.

        Returns:
            Their byte offsets, `(N,)` int64.
        """
        return self.slot_offsets[slots]


# ------------------------------------------------------------------------ opening
def create_file(
    path: Path,
    info: StoreInfo,
    layout: RowLayout,
    *,
    segment_bytes: int,
    quantizer: MemoryQuantizer | None,
) -> h5py.File:
    """Create (or overwrite) an empty store file, open for writing.

    Args:
        path: The file.
        info: What the store holds.
        layout: Its row layout (`RowLayout.for_info(info)`).
        segment_bytes: Largest payload segment, in bytes.
        quantizer: The quantizer the file keeps, or None for raw vectors.

    Returns:
        The open file.

    Raises:
        UserError: When the file cannot be created.
    """
    try:
        file = h5py.File(path, "w")
    except OSError as error:
        raise UserError(f"cannot create the store {path}: {error}") from error
    file.attrs["format"] = FORMAT
    file.attrs["format_version"] = FORMAT_VERSION
    file.attrs["info"] = info.to_json()
    file.attrs["complete"] = False
    file.attrs["checksum"] = "crc32"
    file.attrs["row_layout"] = json.dumps(asdict(layout))
    file.attrs["max_segment_rows"] = max(1, segment_bytes // layout.row_bytes)
    if quantizer is not None:
        blob = np.frombuffer(quantizer.to_bytes(), dtype=np.uint8)
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
    return file


def _differing_field(given: StoreInfo, stored: StoreInfo) -> str | None:
    # Compare as JSON, so that tuples that come back from the file as lists still agree.
    a, b = json.loads(given.to_json()), json.loads(stored.to_json())
    return next((name for name in a if a[name] != b.get(name)), None)


def check_header(
    file: h5py.File,
    path: Path,
    info: StoreInfo | None,
    *,
    writable: bool,
    allow_incomplete: bool,
) -> StoreInfo:
    """Check that an open file is an m3 store this m3 reads, and read what it holds.

    The file is closed when it is refused.

    Args:
        file: The open file.
        path: Its path, for messages.
        info: What the caller expects it to hold; None to take the file's word.
        writable: Whether it is opened to write (an incomplete store is fine then).
        allow_incomplete: Accept a store never marked complete in read mode.

    Returns:
        The file's `StoreInfo`.

    Raises:
        UserError: For a file that is not an m3 store, of a newer format, that holds other
            info than `info`, or is incomplete in read mode.
        CorruptReferenceError: When the file's row layout does not match its info.
    """
    attrs = file.attrs
    try:
        if attrs.get("format") != FORMAT:
            raise UserError(f"{path} is not an m3 HDF5 memory store (no format={FORMAT!r})")
        if int(attrs["format_version"]) > FORMAT_VERSION:
            raise UserError(
                f"{path} has store format {int(attrs['format_version'])}; this m3 reads "
                f"format {FORMAT_VERSION}: upgrade m3"
            )
        stored = StoreInfo.from_json(attrs["info"])
        if info is not None and (name := _differing_field(info, stored)) is not None:
            raise UserError(
                f"{path} holds {name}={getattr(stored, name)!r}, but info says "
                f"{getattr(info, name)!r}"
            )
        if json.loads(attrs["row_layout"]) != asdict(RowLayout.for_info(stored)):
            raise CorruptReferenceError(f"{path}: the row layout does not match its info")
        if not writable and not allow_incomplete and not bool(attrs["complete"]):
            raise UserError(
                f"{path} is an incomplete store (its build never called mark_complete); "
                "resume the build with mode='a', or pass allow_incomplete=True to read it anyway"
            )
    except UserError:
        file.close()
        raise
    return stored


def read_quantizer(
    file: h5py.File, path: Path, info: StoreInfo, given: MemoryQuantizer | None
) -> MemoryQuantizer | None:
    """The quantizer a quantized file holds; check one given for it.

    Args:
        file: The open file.
        path: Its path, for messages.
        info: The file's `StoreInfo`.
        given: The quantizer the caller passed, or None.

    Returns:
        `given` when it matches, the file's own quantizer when none was given, or None for
        a store of raw vectors.

    Raises:
        UserError: For a quantizer given for a raw store, or one that is not the file's.
        CorruptReferenceError: When the stored quantizer is missing, damaged or does not
            match the fingerprint in the file's info.
    """
    recorded = info.quantizer
    if recorded is None:
        if given is not None:
            raise UserError(f"{path} holds raw memories: it takes no quantizer")
        return None
    from m3.memory.quantize import MemoryQuantizer

    fingerprint = recorded.get("fingerprint")
    if given is not None:
        if not given.matches(fingerprint):
            raise UserError(
                f"{path} was written with quantizer {str(fingerprint)[:16]}, not the "
                f"given {given.fingerprint()[:16]}"
            )
        return given
    try:
        blob = file["quantizer"][...].tobytes()
    except (KeyError, OSError) as error:
        raise CorruptReferenceError(
            f"{path}: the quantizer its info records is missing or damaged ({error})"
        ) from error
    quantizer = MemoryQuantizer.from_bytes(blob)
    if not quantizer.matches(fingerprint):
        raise CorruptReferenceError(
            f"{path}: the stored quantizer does not match the fingerprint in its info"
        )
    return quantizer


def open_file(path: Path, *, writable: bool, shared_reader: bool) -> h5py.File:
    """Open an existing store file with h5py, turning its errors into clear ones.

    Args:
        path: The file.
        writable: Open to write ("r+") rather than to read.
        shared_reader: A read-only copy of a store that another process holds open for
            writing (it flushes after every write): open without HDF5's file lock.

    Returns:
        The open file.

    Raises:
        UserError: For a missing file, one locked by a writer in another process, or one
            that is not HDF5.
        CorruptReferenceError: For a truncated file.
    """
    mode = "r+" if writable else "r"
    try:
        try:
            return h5py.File(path, mode)
        except OSError as error:
            if not (shared_reader and "lock" in str(error)):
                raise
            return h5py.File(path, mode, locking=False)
    except FileNotFoundError as error:
        raise UserError(f"no memory store at {path}: the file does not exist") from error
    except OSError as error:
        text = str(error)
        if "truncated" in text:
            raise CorruptReferenceError(
                f"{path} is truncated: the file is shorter than its contents ({text})"
            ) from error
        if "lock" in text:
            holder = "reading or writing it" if writable else "writing it"
            raise UserError(
                f"{path} is open in another process ({holder}): close it there first ({text})"
            ) from error
        raise UserError(f"cannot open {path} as an HDF5 memory store: {text}") from error


def load_tables(file: h5py.File, path: Path, row_bytes: int) -> SlotTables:
    """Read the slot table and the payload segments' byte offsets.

    Args:
        file: The open file.
        path: Its path, for messages.
        row_bytes: Size of a payload row.

    Returns:
        The tables.

    Raises:
        CorruptReferenceError: For a damaged slot table, a segment that is not one of rows,
            a table and segments that disagree, or a reference in several slots.
    """
    try:
        slot_ids = file["refs/id"][...]
    except OSError as error:
        raise CorruptReferenceError(f"{path}: the slot table is damaged ({error})") from error
    starts, offsets = [0], []
    for name in sorted(file["payload"]):
        segment = file["payload"][name]
        if segment.chunks is not None or segment.shape[1:] != (row_bytes,):
            raise CorruptReferenceError(f"{path}: payload/{name} is not a row segment")
        offsets.append(segment.id.get_offset())
        starts.append(starts[-1] + segment.shape[0])
    if len(slot_ids) != starts[-1] or None in offsets:
        raise CorruptReferenceError(
            f"{path}: the slot table has {len(slot_ids)} slots but the payload "
            f"segments hold {starts[-1]} rows"
        )
    used = slot_ids[slot_ids >= 0]
    unique, counts = np.unique(used, return_counts=True)
    if (counts > 1).any():
        raise CorruptReferenceError(
            f"{path}: reference {int(unique[counts > 1][0])} occupies several slots"
        )
    return SlotTables(slot_ids, starts, offsets, row_bytes)


# ------------------------------------------------------------------------ writing
def add_segment(file: h5py.File, tables: SlotTables) -> None:
    """Append a payload segment (twice the previous one, up to the file's largest).

    Args:
        file: The file, open for writing.
        tables: Its tables, grown to the new capacity.
    """
    count, row_bytes = len(tables.offsets), tables.row_bytes
    rows = min(int(file.attrs["max_segment_rows"]), FIRST_SEGMENT_ROWS << min(count, 40))
    # Contiguous, allocated at creation, never filled: one byte offset for all its rows.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple((rows, row_bytes))
    name = f"{count:06d}".encode()
    dataset = h5py.h5d.create(file["payload"].id, name, h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl)
    capacity = tables.capacity + rows
    for name in file["refs"]:
        file["refs"][name].resize((capacity,))
    tables.offsets = np.append(tables.offsets, dataset.get_offset())
    tables.add_offsets(tables.capacity, capacity, dataset.get_offset())
    tables.starts = np.append(tables.starts, capacity)
    tables.slot_ids = np.concatenate([tables.slot_ids, np.full(rows, -1, dtype=np.int64)])
    tables.verified = np.concatenate([tables.verified, np.zeros(rows, dtype=bool)])


def write_rows(file: h5py.File, tables: SlotTables, slots: np.ndarray, rows: np.ndarray) -> None:
    """Write payload rows into their slots.

    Args:
        file: The file, open for writing.
        tables: Its tables.
        slots: `(N,)` int64 slots, within the capacity.
        rows: `(N, row_bytes)` uint8 rows (`m3.backends.hdf5_layout.encode_rows`).
    """
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


def write_meta(
    file: h5py.File, slots: np.ndarray, ids: np.ndarray, references: list[Reference]
) -> None:
    """Write the provenance of slots, then (last) their entries in the slot table.

    Until its slot table entry is written a new slot still reads as free, so an interrupted
    call leaves new ids absent.

    Args:
        file: The file, open for writing.
        slots: `(N,)` int64 slots.
        ids: `(N,)` int64 reference ids.
        references: `N` normalised references.
    """
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
    refs["doc_is_int"][where] = np.array([not isinstance(r.doc_id, str) for r in picked], np.uint8)
    refs["start"][where] = np.array([r.start for r in picked], np.int64)
    refs["end"][where] = np.array([r.end for r in picked], np.int64)
    # write_direct: `ds[where] = tokens` misreads equally long token lists as a 2-D array
    refs["tokens"].write_direct(tokens, dest_sel=np.s_[where])
    crcs = [meta_crc(int(ids[i]), references[i]) for i in order.tolist()]
    refs["meta_crc"][where] = np.array(crcs, np.uint32)
    refs["id"][where] = ids[order]


def read_meta(file: h5py.File, slots: np.ndarray, path: Path) -> list[tuple[Reference, int]]:
    """Provenance and its stored crc for sorted, distinct slots.

    Args:
        file: The open file.
        slots: `(N,)` int64 slots, ascending and distinct.
        path: The file's path, for the message.

    Returns:
        `N` pairs `(reference, stored meta crc)`; check them with `meta_crc`.

    Raises:
        CorruptReferenceError: When HDF5 cannot read the provenance.
    """
    if len(slots) == 0:
        return []
    refs = file["refs"]
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
        raise CorruptReferenceError(f"{path}: provenance is damaged ({error})") from error
    out = []
    for i in range(len(slots)):
        doc_id: str | int = int(doc_ids[i]) if is_int[i] else str(doc_ids[i])
        reference = Reference(doc_id, int(starts[i]), int(ends[i]), tuple(tokens[i].tolist()))
        out.append((reference, int(crcs[i])))
    return out
