"""No dead ends after a kill: the writing marker of an `HDF5Store`, and salvage.

HDF5 keeps no journal. A process killed while it writes (SIGKILL, a lost node, power) can
leave the file's own metadata half updated — its B-trees, the heap that holds the
variable-length doc ids and token lists — and a later write may then fail for good
(`bad heap index`) while reads still seem to work. So a store is never written after an
unclean stop:

- `HDF5Store` opened to write first leaves a marker next to the file,
  `<file>.writing` (`begin_writing`), and removes it only after a clean close has synced
  the file to disk (`end_writing`).
- A marker whose process is gone (`interrupted_writer`) means the file cannot be trusted.
  A writer that finds one calls `salvage`: every reference whose payload row and provenance
  pass their checksums is copied, raw, into a fresh file, which is synced and renamed over
  the old one; whatever failed its checks is simply absent, so a resumed build encodes it
  again. A kill during the salvage leaves the old file and its marker as they were.
- A reader refuses a file with such a marker, naming it: resume the build or the edit that
  was writing it, or run `m3 verify BANK --repair`.

The copy costs one pass over the shard, after an unclean stop only; an uninterrupted build
pays a marker file per open and nothing per write.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from m3.backends.base import CorruptReferenceError, StoreInfo
from m3.backends.hdf5_file import (
    SlotTables,
    add_segment,
    create_file,
    load_tables,
    read_meta,
    read_quantizer,
    write_meta,
    write_rows,
)
from m3.backends.hdf5_layout import RowLayout, meta_crc
from m3.backends.hdf5_reader import RowBuffers, read_rows
from m3.core.errors import UserError
from m3.core.runs import process_alive

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer

#: bytes of rows copied at a time by `salvage`
_SALVAGE_BYTES = 64 << 20
#: paths this process holds open for writing (a marker with our pid and a path not here is
#: one that a store left behind without closing)
_WRITING: set[Path] = set()


def marker_path(path: Path) -> Path:
    """The writing marker of a store file.

    Args:
        path: The store file.

    Returns:
        `<file>.writing` next to it.
    """
    return path.with_name(path.name + ".writing")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a file or a folder (its entries)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def interrupted_writer(path: Path) -> dict | None:
    """The marker of a writer that stopped without closing the file, if there is one.

    Args:
        path: The store file.

    Returns:
        The marker's record (`pid`, `host`) when a writer on this host died while it held
        the file (or a store of this process was dropped without `close()`); None when
        there is no marker or its writer still runs (another host's writer counts as
        running: its process cannot be checked from here).
    """
    marker = marker_path(path)
    try:
        record = json.loads(marker.read_text())
        pid, host = int(record["pid"]), str(record["host"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        return {"pid": None, "host": None}  # a marker cut short by the kill itself
    if host != socket.gethostname():
        return None
    if pid <= 0:  # no process: os.kill would signal a whole process group
        return record
    if pid == os.getpid():
        return None if path.resolve() in _WRITING else record
    return None if process_alive(pid) else record


def running_writer(path: Path) -> dict | None:
    """The marker of a writer that still holds the file open, if there is one.

    Args:
        path: The store file.

    Returns:
        The marker's record (`pid`, `host`), or None when no live writer holds the file.
    """
    marker = marker_path(path)
    if not marker.exists() or interrupted_writer(path) is not None:
        return None
    try:
        return json.loads(marker.read_text())
    except (ValueError, OSError):
        return None


def begin_writing(path: Path) -> None:
    """Leave the writing marker (synced) before the first byte of the file changes.

    Args:
        path: The store file.

    Raises:
        UserError: When another live process (or another store of this one) is writing it.
    """
    if (writer := running_writer(path)) is not None:
        raise UserError(
            f"{path} is open for writing in process {writer.get('pid')} on "
            f"{writer.get('host')}: wait for it to finish (or stop it) first"
        )
    marker = marker_path(path)
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    _fsync(partial)
    partial.replace(marker)
    _fsync(marker.parent)
    _WRITING.add(path.resolve())


def end_writing(path: Path, *, synced: bool = False) -> None:
    """Sync the closed file to disk, then remove its writing marker.

    Args:
        path: The store file, closed by this process.
        synced: The file was synced after its last write already (`mark_complete`).
    """
    if path.exists() and not synced:
        _fsync(path)
    marker_path(path).unlink(missing_ok=True)
    _fsync(path.parent)
    _WRITING.discard(path.resolve())


def refuse_interrupted(path: Path) -> None:
    """Refuse to read a file whose last writer died while writing it.

    Args:
        path: The store file.

    Raises:
        UserError: Naming the marker and how to recover.
    """
    if (record := interrupted_writer(path)) is None:
        return
    raise UserError(
        f"{path}: its last writer (process {record.get('pid')}) stopped while writing it "
        f"({marker_path(path).name} is left), so the file cannot be trusted: resume the "
        "build (m3 build-memory) or edit (m3 edit --resume) that wrote it, or run "
        "m3 verify BANK --repair"
    )


def _sound_batches(
    file: h5py.File, path: Path, layout: RowLayout, tables: SlotTables
) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
    """The ids, raw rows and provenance of the references that pass all their checks.

    Yields one batch of at most `_SALVAGE_BYTES` of rows at a time, so that a shard of any
    size is copied in bounded memory.
    """
    used = np.flatnonzero(tables.slot_ids >= 0)
    buffers, step = RowBuffers(), max(1, _SALVAGE_BYTES // layout.row_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in range(0, len(used), step):
            slots = used[start : start + step]
            ids = tables.slot_ids[slots]
            rows, iov = buffers.take(len(slots), layout.row_bytes)
            short = read_rows(fd, tables.slot_offsets[slots], rows, iov)
            bad = layout.misplaced(rows, ids) | (short if short is not None else False)
            which = np.flatnonzero(~bad)
            bad[which] = ~layout.crc_ok(rows, which)
            try:
                found: list = read_meta(file, slots, path)
            except CorruptReferenceError:  # one damaged entry spoils the batch: go one by one
                found = []
                for slot in slots.tolist():
                    try:
                        found += read_meta(file, np.array([slot]), path)
                    except CorruptReferenceError:
                        found.append(None)
            keep = [
                j
                for j, entry in enumerate(found)
                if not bad[j] and entry is not None and meta_crc(int(ids[j]), entry[0]) == entry[1]
            ]
            yield ids[keep], rows[keep], [found[j][0] for j in keep]
    finally:
        os.close(fd)


def salvage(
    path: Path, *, info: StoreInfo | None, quantizer: MemoryQuantizer | None
) -> tuple[int, int]:
    """Copy the sound references of an interrupted store into a fresh file, in its place.

    Rows are copied raw (a quantized store's codes too), a batch at a time; the fresh file is
    synced and renamed over the old one, so a kill during the salvage leaves the old file
    and its marker, and the next writer salvages again.

    Args:
        path: The store file, whose writer died (its marker is left).
        info: What the store holds, to start an empty file when the old one's header cannot
            be read; None to refuse then.
        quantizer: The store's quantizer, likewise (a quantized store's file keeps its own).

    Returns:
        `(kept, lost)`: references copied, and references the old slot table listed that
        failed a check (they are absent from the new file).

    Raises:
        CorruptReferenceError: When the old file's header cannot be read and no `info` was
            given.
    """
    fresh = path.with_name(path.name + ".salvage")
    fresh.unlink(missing_ok=True)
    old, tables, segment_rows, reason = None, None, None, None
    try:
        old = h5py.File(path, "r", locking=False)
        info = StoreInfo.from_json(old.attrs["info"])
        quantizer = read_quantizer(old, path, info, None)
        segment_rows = int(old.attrs["max_segment_rows"])
        tables = load_tables(old, path, RowLayout.for_info(info).row_bytes)
    except (OSError, KeyError, ValueError, UserError, CorruptReferenceError) as error:
        reason = error  # nothing (more) to copy: the fresh file starts empty
    if info is None:
        raise CorruptReferenceError(
            f"{path}: cannot salvage it, its header is unreadable: {reason}"
        )
    layout = RowLayout.for_info(info)
    segment_bytes = (segment_rows or 1 << 30) * layout.row_bytes
    listed = kept = 0
    file = create_file(fresh, info, layout, segment_bytes=segment_bytes, quantizer=quantizer)
    try:
        if tables is not None:
            listed = int((tables.slot_ids >= 0).sum())
            target = load_tables(file, fresh, layout.row_bytes)
            with contextlib.suppress(OSError):  # a batch HDF5 cannot read ends the copy
                for ids, rows, references in _sound_batches(old, path, layout, tables):
                    if not len(ids):
                        continue
                    slots = target.allocator.take(len(ids))
                    while target.allocator.end > target.capacity:
                        add_segment(file, target)
                    write_rows(file, target, slots, rows)
                    write_meta(file, slots, ids, references)
                    kept += len(ids)
        file.flush()
    finally:
        file.close()
        if old is not None:
            old.close()
    _fsync(fresh)
    fresh.replace(path)
    _fsync(path.parent)
    return kept, max(0, listed - kept)
