"""What an `HDF5Store` file holds, and the byte format of one payload row.

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
| `refs/meta_crc` | uint32 crc32 of the slot's id and provenance (`meta_crc`) |

Segments have 64 rows, then twice as many as the previous one, up to `segment_bytes`; slot
`s` is row `s − first slot of its segment` of the segment that holds it. A payload row
(`RowLayout`) holds `keys | values | positions (int16) | valid (uint8) | padding | id (int64)
| magic "M3R1" | crc32 of everything before it`, so one `preadv` reads one reference and its
checksum, and the stored id catches a slot table that points at the wrong row. Keys and
values are the raw bytes of `info.dtype` (bf16 as its 16-bit pattern), or, in a quantized
store, the uint8 codes of a `MemoryQuantizer`, kept whole in the dataset `quantizer` (its
`to_bytes()`, checked against the fingerprint in `info.quantizer`): the file reopens by
itself and reads decode to `info.dtype`.

`encode_rows` and `decode_rows` turn memories into rows and back; `RowLayout.misplaced`
and `RowLayout.crc_ok` check a batch of rows read back.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import StoreInfo
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

    def misplaced(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Which rows do not hold the reference asked for: another id, or no marker.

        Rows are a whole number of 8-byte words, so each trailer field is one column of an
        integer view of the batch (no copies).

        Args:
            rows: `(N, row_bytes)` uint8 rows read back.
            ids: `(N,)` int64 ids they should hold.

        Returns:
            `(N,)` bool, True for a row that is a hole, cut off or another reference's.
        """
        stored_id = rows.view("<i8")[:, self.id // 8]
        magic = rows.view("<u4")[:, self.magic // 4]
        return (stored_id != ids) | (magic != ROW_MAGIC)

    def crc_ok(self, rows: np.ndarray, which: np.ndarray) -> np.ndarray:
        """Whether chosen rows match their stored crc32.

        Args:
            rows: `(N, row_bytes)` uint8 rows.
            which: `(M,)` indices of the rows to check.

        Returns:
            `(M,)` bool, True where the row's bytes match its checksum.
        """
        stored = rows.view("<u4")[which, self.crc // 4]
        body = rows[:, : self.crc]
        crcs = np.fromiter((zlib.crc32(body[j]) for j in which.tolist()), np.uint32, len(which))
        return crcs == stored


def encode_rows(
    layout: RowLayout,
    info: StoreInfo,
    quantizer: MemoryQuantizer | None,
    ids: np.ndarray,
    memory: SparseMemory,
    *,
    where: str,
) -> np.ndarray:
    """The payload rows of references, checksums included.

    Args:
        layout: The store's row layout.
        info: The store's description (the dtype of raw keys and values).
        quantizer: The store's quantizer (rows hold its codes), or None for raw vectors.
        ids: `(N,)` int64 reference ids.
        memory: Their sparse memories.
        where: Name of the store, for the message.

    Returns:
        `(N, row_bytes)` uint8 rows.

    Raises:
        UserError: For a selected position outside −1..32767 (int16 storage).
    """
    count = len(ids)
    positions = memory.positions.detach().cpu()
    out_of_range = (positions < -1) | (positions > np.iinfo(np.int16).max)
    if out_of_range.any():
        row = int(out_of_range.flatten(1).any(1).nonzero()[0, 0])
        raise UserError(
            f"{where}: reference {int(ids[row])} has a selected position outside "
            "-1..32767, which int16 storage cannot hold"
        )
    rows = np.zeros((count, layout.row_bytes), dtype=np.uint8)

    def raw(tensor: Tensor) -> np.ndarray:
        return tensor.detach().contiguous().view(torch.uint8).reshape(count, -1).numpy()

    if quantizer is not None:
        codes = quantizer.encode(memory)
        keys, values = codes.keys.cpu(), codes.values.cpu()
    else:
        dtype = info.torch_dtype
        keys, values = memory.keys.to("cpu", dtype), memory.values.to("cpu", dtype)
    rows[:, layout.keys : layout.values] = raw(keys)
    rows[:, layout.values : layout.positions] = raw(values)
    rows[:, layout.positions : layout.valid] = raw(positions.to(torch.int16))
    tokens = memory.valid.shape[1]
    rows[:, layout.valid : layout.valid + tokens] = memory.valid.cpu().numpy()
    rows[:, layout.id : layout.magic] = ids.astype("<i8").view(np.uint8).reshape(count, 8)
    rows[:, layout.magic : layout.crc] = np.frombuffer(ROW_MAGIC.to_bytes(4, "little"), np.uint8)
    crcs = np.fromiter((zlib.crc32(row[: layout.crc]) for row in rows), np.uint32, count)
    rows[:, layout.crc :] = crcs.astype("<u4").view(np.uint8).reshape(count, 4)
    return rows


def decode_rows(
    layout: RowLayout, info: StoreInfo, quantizer: MemoryQuantizer | None, rows: np.ndarray
) -> SparseMemory:
    """The sparse memories that payload rows hold.

    Raw keys and values are views into `rows` (strided over whole rows, not contiguous
    across references); a quantized store's codes are decoded to `info.dtype`.

    Args:
        layout: The store's row layout.
        info: The store's description.
        quantizer: The store's quantizer, or None for raw vectors.
        rows: `(N, row_bytes)` uint8 rows.

    Returns:
        Keys and values `(N, L_mem, H_kv, k, d_h)` in `info.torch_dtype`, valid `(N, k)`,
        positions `(N, L_mem, H_kv, k)` int64.
    """
    count = rows.shape[0]
    layers, _, heads, tokens, dim = info.memory_shape
    dtype = info.torch_dtype
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
    if quantizer is not None:
        return _decode_codes(layout, info, quantizer, rows, valid, positions_tensor)
    # Tensors made from `rows` itself keep it alive, which is what frees its buffer for
    # reuse only once they are gone (numpy views would point at the buffer instead).
    typed, size = torch.from_numpy(rows).view(dtype), dtype.itemsize
    memory_shape = (count, layers, heads, tokens, dim)
    memory_strides = (layout.row_bytes // size, heads * tokens * dim, tokens * dim, dim, 1)
    keys = typed.as_strided(memory_shape, memory_strides, layout.keys // size)
    values = typed.as_strided(memory_shape, memory_strides, layout.values // size)
    return SparseMemory(keys, values, valid, positions_tensor)


def _decode_codes(
    layout: RowLayout,
    info: StoreInfo,
    quantizer: MemoryQuantizer,
    rows: np.ndarray,
    valid: Tensor,
    positions: Tensor,
) -> SparseMemory:
    """Decode the key and value codes of `(N, row_bytes)` rows to `info.dtype`."""
    from m3.memory.quantize import QuantizedMemory

    count = rows.shape[0]
    layers, _, heads, tokens, _ = info.memory_shape
    key_bytes, value_bytes = info.vector_bytes
    raw = torch.from_numpy(rows)

    def codes(offset: int, width: int) -> Tensor:
        shape = (count, layers, heads, tokens, width)
        strides = (layout.row_bytes, heads * tokens * width, tokens * width, width, 1)
        return raw.as_strided(shape, strides, offset)

    quantized = QuantizedMemory(
        codes(layout.keys, key_bytes), codes(layout.values, value_bytes), valid, positions
    )
    return quantizer.decode(quantized, dtype=info.torch_dtype)


def meta_crc(reference_id: int, reference: Reference) -> int:
    """The crc32 that `refs/meta_crc` keeps of a slot's id and provenance.

    Args:
        reference_id: The reference's id.
        reference: Its provenance and token ids.

    Returns:
        The crc32, as an unsigned int.
    """
    doc_id, start, end, ids = reference
    head = f"{reference_id}\0{type(doc_id).__name__}\0{doc_id}\0{start}\0{end}\0".encode()
    return zlib.crc32(np.asarray(ids, dtype="<i4").tobytes(), zlib.crc32(head))
