"""Rotary scaling: the frequency schedules long-context checkpoints were trained with.

The paper's model uses plain RoPE (paper §3.4); the checkpoints people start from often
stretch it to reach longer contexts than they were pretrained on. `RopeScaling` names one of
the three schedules m3 computes, with the parameters a Hugging Face `config.json` gives it
under `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5), and
`scaled_frequencies` turns plain RoPE frequencies into the scaled ones, as transformers
computes them:

- "linear": every frequency divided by `factor` (position interpolation);
- "llama3" (Llama 3.1 / 3.2): wavelengths longer than `original_max_position_embeddings /
  low_freq_factor` are divided by `factor`, shorter than `… / high_freq_factor` kept, and
  those between interpolated smoothly;
- "yarn" (Qwen's long-context variants): a ramp between kept and divided frequencies over
  the dimensions whose number of rotations within `original_max_position_embeddings` lies
  between `beta_slow` and `beta_fast`, and the cosines and sines multiplied by an attention
  factor (`0.1·ln(factor) + 1` unless given).

```python
scaling = RopeScaling.from_dict(
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
)
config = Config(rope_base=500000.0, rope_scaling=scaling)   # or the dict itself
```

Any other type ("dynamic", "longrope", ...) is refused by name: its positions would differ
from the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from m3.core.errors import UserError

if TYPE_CHECKING:  # the config is read without torch (m3 check, m3 size): imported when used
    from torch import Tensor

ROPE_TYPES = ("linear", "llama3", "yarn")
"""The rotary scaling types m3 computes."""

_REQUIRED: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_OPTIONAL: dict[str, tuple[str, ...]] = {
    "linear": (),
    "llama3": (),
    "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"),
}


@dataclass(frozen=True)
class RopeScaling:
    """One rotary scaling schedule and its parameters (the names are transformers').

    Attributes:
        rope_type: "linear", "llama3" or "yarn".
        factor: How much longer the scaled context is than the original one.
        low_freq_factor: llama3: wavelengths beyond `original / low_freq_factor` are scaled.
        high_freq_factor: llama3: wavelengths below `original / high_freq_factor` are kept.
        original_max_position_embeddings: llama3, yarn: the pretraining context length.
        beta_fast: yarn: rotations above which a dimension is kept (32 when None).
        beta_slow: yarn: rotations below which a dimension is scaled (1 when None).
        attention_factor: yarn: multiplies cosines and sines; from `factor` (and `mscale`,
            `mscale_all_dim`) when None.
        mscale: yarn: numerator's multiplier of `ln(factor)` for the attention factor.
        mscale_all_dim: yarn: denominator's multiplier of `ln(factor)` for it.
        truncate: yarn: round the ramp's ends to whole dimensions (True when None).
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "rope_scaling") -> RopeScaling:
        """Parse a scaling as config.json or a recipe writes it.

        Args:
            data: `rope_type` (or `type`) and that type's parameters; `rope_theta` is
                ignored (it is `Config.rope_base`).
            where: Name of the mapping in messages.

        Returns:
            The scaling.

        Raises:
            UserError: For another type, or a missing, unknown or invalid parameter (all
                in one message, each named).
        """
        if not isinstance(data, Mapping):
            raise UserError(f"{where} must be a mapping with a rope_type, got {data!r}")
        kind = data.get("rope_type", data.get("type"))
        if kind is None:
            raise UserError(f"{where}: rope_type is missing: choose one of {list(ROPE_TYPES)}")
        if kind not in ROPE_TYPES:
            raise UserError(
                f"{where}: rope_type {kind!r} is not supported: m3 computes "
                f"{list(ROPE_TYPES)}, and another type would give other positions"
            )
        given = {k: v for k, v in data.items() if k not in ("rope_type", "type", "rope_theta")}
        given = {k: v for k, v in given.items() if v is not None}
        allowed = _REQUIRED[kind] + _OPTIONAL[kind]
        problems = [
            f"{where}.{k} is not a parameter of {kind!r}" for k in given if k not in allowed
        ]
        problems += [
            f"{where}.{k} is required for {kind!r}" for k in _REQUIRED[kind] if k not in given
        ]
        if problems:
            raise UserError("; ".join(problems))
        scaling = cls(rope_type=kind, **given)
        problems = list(scaling._problems(where))
        if problems:
            raise UserError("; ".join(problems))
        return scaling

    def _problems(self, where: str) -> Any:
        numbers = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow")
        for key in (*numbers, "attention_factor", "mscale", "mscale_all_dim"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                yield f"{where}.{key} must be a positive number, got {value!r}"
        original = self.original_max_position_embeddings
        if original is not None and (not isinstance(original, int) or original < 1):
            yield f"{where}.original_max_position_embeddings must be a positive integer"
        if self.truncate is not None and not isinstance(self.truncate, bool):
            yield f"{where}.truncate must be true or false, got {self.truncate!r}"
        low, high = self.low_freq_factor, self.high_freq_factor
        if self.rope_type == "llama3" and low is not None and high is not None and high <= low:
            yield f"{where}.high_freq_factor ({high}) must exceed low_freq_factor ({low})"

    def to_dict(self) -> dict[str, Any]:
        """The type and the parameters that were given (None left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def cos_sin_factor(self) -> float:
        """The factor cosines and sines are multiplied by (1 except for yarn)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale: float, weight: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        return mscale(self.factor)


def scaled_frequencies(inv_freq: Tensor, scaling: RopeScaling, *, base: float) -> Tensor:
    """Apply a scaling schedule to plain RoPE frequencies.

    Args:
        inv_freq: `(d_h / 2,)` fp32 plain frequencies `base^(−2i/d_h)`.
        scaling: The schedule.
        base: RoPE's base (yarn's ramp depends on it).

    Returns:
        `(d_h / 2,)` fp32 scaled frequencies.
    """
    import torch

    factor = float(scaling.factor)
    if scaling.rope_type == "linear":
        return inv_freq / factor
    original = scaling.original_max_position_embeddings
    assert original is not None
    if scaling.rope_type == "llama3":
        low, high = float(scaling.low_freq_factor or 1), float(scaling.high_freq_factor or 4)
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < original / high) & ~(wavelength > original / low)
        return torch.where(medium, smoothed, scaled)
    # yarn: dimensions that turn more than beta_fast times in the original context keep
    # their frequency, fewer than beta_slow times are divided by factor, a ramp between
    dim = 2 * inv_freq.shape[0]

    def dimension(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = dimension(float(scaling.beta_fast or 32))
    high = dimension(float(scaling.beta_slow or 1))
    if scaling.truncate is None or scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp.to(inv_freq.device)
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep
