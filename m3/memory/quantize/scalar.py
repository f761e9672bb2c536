"""Quantizers that code each element on its own: raw bytes of a dtype, and int8 with a scale.

`RawQuantizer` (also `NoQuantizer`) keeps the bytes of a float dtype, so that a store treats
raw and quantized vectors alike; `Int8Quantizer` keeps one int8 per element and one scale
per vector. Neither needs training.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from m3.core.checks import check_choice
from m3.core.errors import UserError
from m3.memory.quantize.base import VectorQuantizer

#: Float dtypes of raw codes and of int8 scales, by name.
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FloatDtype = Literal["float32", "bfloat16", "float16"]
ScaleDtype = Literal["float16", "bfloat16", "float32"]


class RawQuantizer(VectorQuantizer):
    """The identity: a code is the raw bytes of the vector in a dtype.

    Lets a store treat quantized and raw vectors alike. Nothing to train. Vectors already in
    `dtype` round-trip bit-exactly; others are cast (rounded) to it.

    Args:
        dim: Dimension `d` of the vectors.
        dtype: "bfloat16" (the paper's storage, `2·d` bytes), "float16" or "float32".
    """

    def __init__(self, dim: int, *, dtype: FloatDtype = "bfloat16") -> None:
        super().__init__(dim)
        self.dtype = check_choice("RawQuantizer", "dtype", dtype, FLOAT_DTYPES)

    @property
    def code_bytes(self) -> int:
        """`d × itemsize` of the dtype."""
        return self.dim * FLOAT_DTYPES[self.dtype].itemsize

    def init_args(self) -> dict[str, Any]:
        """See `VectorQuantizer.init_args`."""
        return {"dim": self.dim, "dtype": self.dtype}

    def encode(self, vectors: Tensor) -> Tensor:
        """The raw bytes of `vectors` cast to the dtype, `(n, d)` -> `(n, code_bytes)` uint8."""
        self._check_vectors(vectors, "encode")
        return self._encode(vectors)

    def _encode(self, vectors: Tensor) -> Tensor:
        return vectors.to(FLOAT_DTYPES[self.dtype]).contiguous().view(torch.uint8)

    def _decode(self, codes: Tensor) -> Tensor:
        return codes.contiguous().view(FLOAT_DTYPES[self.dtype]).float()


#: The issue's name for `RawQuantizer` ("no quantization"). Recipes say `raw`: the short name
#: `no` would read as the boolean false in YAML.
NoQuantizer = RawQuantizer


class Int8Quantizer(VectorQuantizer):
    """Symmetric per-vector int8: `x ≈ q · s` with `q` in −127 … 127 and one scale per vector.

    The scale is `max |x_i| / 127`, rounded *up* to the scale dtype, so no value is clipped:
    every element is within half a step, `|x_i − q_i s| ≤ s / 2`. A code is the `d` int8
    values followed by the scale's bytes: `d + 2` bytes with a float16 or bfloat16 scale,
    `d + 4` with float32. A float16 scale cannot hold vectors whose largest element exceeds
    about 8.3 million (encode refuses them); bfloat16 has float32's range at coarser scale
    steps. Nothing to train.

    Args:
        dim: Dimension `d` of the vectors.
        scale_dtype: "float16" (default), "bfloat16" or "float32".
    """

    def __init__(self, dim: int, *, scale_dtype: ScaleDtype = "float16") -> None:
        super().__init__(dim)
        self.scale_dtype = check_choice("Int8Quantizer", "scale_dtype", scale_dtype, FLOAT_DTYPES)

    @property
    def code_bytes(self) -> int:
        """`d` + the scale's bytes."""
        return self.dim + FLOAT_DTYPES[self.scale_dtype].itemsize

    def init_args(self) -> dict[str, Any]:
        """See `VectorQuantizer.init_args`."""
        return {"dim": self.dim, "scale_dtype": self.scale_dtype}

    def scales(self, vectors: Tensor) -> Tensor:
        """The scale of each vector, as stored.

        Args:
            vectors: `(n, d)` float vectors.

        Returns:
            `(n,)` scales in the scale dtype: the smallest representable value at least
            `max |x_i| / 127`.
        """
        dtype = FLOAT_DTYPES[self.scale_dtype]
        exact = vectors.float().abs().amax(dim=1) / 127
        scale = exact.to(dtype)
        if dtype != torch.float32:
            # a scale rounded down would clip the largest element: step to the next value
            # up (for positive finite values, the next bit pattern)
            low = scale.float() < exact
            bumped = (scale.view(torch.int16) + 1).view(dtype)
            scale = torch.where(low, bumped, scale)
        return scale

    def _encode(self, vectors: Tensor) -> Tensor:
        if not torch.isfinite(vectors).all():
            raise UserError("Int8Quantizer.encode: vectors hold NaN or infinity")
        scale = self.scales(vectors)
        if not torch.isfinite(scale).all():
            raise UserError(
                f"Int8Quantizer.encode: a vector's largest element is beyond what a "
                f"{self.scale_dtype} scale can hold (max {float(vectors.abs().max()):.3g}); "
                "use scale_dtype='float32' or 'bfloat16'"
            )
        wide = scale.float()[:, None]
        values = torch.where(wide > 0, vectors / wide.clamp(min=torch.finfo(torch.float32).tiny), 0)
        values = values.round().clamp_(-127, 127).to(torch.int8)
        return torch.cat([values.view(torch.uint8), scale[:, None].view(torch.uint8)], dim=1)

    def _decode(self, codes: Tensor) -> Tensor:
        values = codes[:, : self.dim].contiguous().view(torch.int8).float()
        scale = codes[:, self.dim :].contiguous().view(FLOAT_DTYPES[self.scale_dtype]).float()
        return values * scale
