"""Bit packing: integer codes of any width 1…16 as one little-endian bit stream per row.

Field `j` of width `b` occupies bits `j·b … j·b + b − 1` of its row's stream, bit `i` of the
stream being bit `i mod 8` of byte `i div 8`: 8 codes of 10 bits (the paper's residual PQ)
take 10 bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from m3.core.checks import check_int
from m3.core.errors import UserError

#: rows packed or unpacked at a time
_PACK_ROWS = 1 << 16
#: widest code field: 2^16 centroids per codebook
MAX_BITS = 16


def packed_bytes(fields: int, bits: int) -> int:
    """Bytes of one packed row of codes (`pack_codes`): `ceil(fields · bits / 8)`.

    Args:
        fields: Codes per row `m`, e.g. a product quantizer's subspaces.
        bits: Width of one code in bits.

    Returns:
        The row's size in bytes: 10 for the paper's 8 fields of 10 bits.
    """
    return -(-fields * bits // 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes into a little-endian bit stream, row by row.

    Args:
        codes: `(n, m)` integer codes, each in `0 … 2^bits − 1`.
        bits: Width of one code, 1 to 16.

    Returns:
        `(n, ceil(m · bits / 8))` uint8; code `j` fills bits `j·bits …` of its row's stream.

    Raises:
        UserError: For a width outside 1 … 16 or a code that does not fit it.
    """
    bits = check_int("pack_codes", "bits", bits, low=1, high=MAX_BITS)
    if codes.dim() != 2:
        raise UserError(f"pack_codes: codes must be (n, m), got shape {tuple(codes.shape)}")
    codes = codes.long()
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise UserError(f"pack_codes: codes must lie in 0..{(1 << bits) - 1} for bits={bits}")
    count, fields = codes.shape
    width = packed_bytes(fields, bits)
    out = torch.empty(count, width, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(bits, device=codes.device)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=codes.device)
    for start in range(0, count, _PACK_ROWS):
        block = codes[start : start + _PACK_ROWS]
        stream = ((block[..., None] >> shifts) & 1).to(torch.int32).flatten(1)
        stream = torch.nn.functional.pad(stream, (0, width * 8 - fields * bits))
        out[start : start + _PACK_ROWS] = (stream.view(-1, width, 8) * weights).sum(-1)
    return out


def unpack_codes(packed: Tensor, bits: int, fields: int) -> Tensor:
    """Inverse of `pack_codes`.

    Args:
        packed: `(n, ceil(fields · bits / 8))` uint8.
        bits: Width of one code, 1 to 16.
        fields: Codes per row `m`.

    Returns:
        `(n, m)` int64 codes.
    """
    bits = check_int("unpack_codes", "bits", bits, low=1, high=MAX_BITS)
    width = packed_bytes(fields, bits)
    if packed.dim() != 2 or packed.shape[1] != width or packed.dtype != torch.uint8:
        raise UserError(
            f"unpack_codes: expected uint8 codes of shape (n, {width}) for {fields} fields of "
            f"{bits} bits, got {packed.dtype} {tuple(packed.shape)}"
        )
    count = packed.shape[0]
    out = torch.empty(count, fields, dtype=torch.long, device=packed.device)
    # Field j starts at bit j·bits: in byte (j·bits) div 8, at shift (j·bits) mod 8. A field
    # of at most 16 bits at a shift of at most 7 lies within 3 bytes, read as one little-
    # endian integer (two zero bytes of padding let the last fields read past the row).
    starts = torch.arange(fields, device=packed.device) * bits
    first, shift = starts // 8, (starts % 8).int()
    mask = (1 << bits) - 1
    for start in range(0, count, _PACK_ROWS):
        block = torch.nn.functional.pad(packed[start : start + _PACK_ROWS], (0, 2)).int()
        word = block[:, first] | (block[:, first + 1] << 8) | (block[:, first + 2] << 16)
        out[start : start + _PACK_ROWS] = ((word >> shift) & mask).long()
    return out
