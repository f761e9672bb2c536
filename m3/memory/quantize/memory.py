"""Quantizers applied to whole sparse memories: every key and value vector of each reference.

`MemoryQuantizer` trains on the key and value vectors of sampled references (separately by
default: their distributions differ, keys carry the rotary rotation) and codes a
`SparseMemory` into a `QuantizedMemory` of uint8 codes, which stores keep in fixed-size
rows; `memory_vectors` gathers the vectors of valid slots to train on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import Tensor

from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.memory.quantize.base import (
    FORMAT,
    FORMAT_VERSION,
    BytesRoundTrip,
    VectorQuantizer,
    load_file,
)


@dataclass
class QuantizedMemory:
    """The sparse memories of `N` references with key and value vectors as codes.

    Attributes:
        keys: `(N, L_mem, H_kv, k, key_bytes)` uint8 codes of the keys.
        values: `(N, L_mem, H_kv, k, value_bytes)` uint8 codes of the values.
        valid: `(N, k)` bool, as in `SparseMemory`.
        positions: `(N, L_mem, H_kv, k)` long, as in `SparseMemory`.
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return self.keys.shape[0]


def memory_vectors(memory: SparseMemory, *, part: Literal["keys", "values"]) -> Tensor:
    """The key or value vectors of a memory's valid slots, e.g. to train a quantizer on.

    Args:
        memory: Sparse memories, `(N, L_mem, H_kv, k, d_h)` keys and values.
        part: "keys" or "values".

    Returns:
        `(n, d_h)` vectors, `n = L_mem · H_kv ·` (valid slots).
    """
    tensor = {"keys": memory.keys, "values": memory.values}[part]
    mask = memory.valid[:, None, None, :].expand(tensor.shape[:4])
    return tensor[mask]


class MemoryQuantizer(BytesRoundTrip):
    """Quantizers for every key and value vector of sparse memories.

    Keys and values are coded separately: by default `values` is an untrained copy of
    `keys`' settings, trained on the value vectors only. Passing the same object for both
    trains one quantizer on keys and values together.

    Args:
        keys: Quantizer of the key vectors.
        values: Quantizer of the value vectors; an untrained copy of `keys` when None.
    """

    def __init__(self, keys: VectorQuantizer, values: VectorQuantizer | None = None) -> None:
        if values is None:
            values = VectorQuantizer.from_description(keys.describe())
        if keys.dim != values.dim:
            raise UserError(f"MemoryQuantizer: keys have dim {keys.dim}, values dim {values.dim}")
        self.keys = keys
        self.values = values

    @property
    def shared(self) -> bool:
        """Whether keys and values use one quantizer."""
        return self.keys is self.values

    @property
    def fitted(self) -> bool:
        """Whether both quantizers are trained."""
        return self.keys.fitted and self.values.fitted

    def memory_bytes(self, memory_shape: tuple[int, ...]) -> int:
        """Bytes of the codes of one reference's memory.

        Args:
            memory_shape: `(L_mem, 2, H_kv, k, d_h)` (`Config.memory_shape`).

        Returns:
            `L_mem · H_kv · k · (key code bytes + value code bytes)`: 39,424 for the
            paper's `(22, 2, 8, 8, 80)` with `CompositeQuantizer(80)`.
        """
        layers, _, heads, tokens, _ = memory_shape
        return layers * heads * tokens * (self.keys.code_bytes + self.values.code_bytes)

    def _check(self, memory: SparseMemory, what: str) -> None:
        dim = memory.keys.shape[-1]
        if dim != self.keys.dim:
            raise UserError(
                f"MemoryQuantizer.{what}: memory head dimension is {dim}, "
                f"the quantizers have dim {self.keys.dim}"
            )

    def fit(self, memory: SparseMemory, *, seed: int = 0) -> MemoryQuantizer:
        """Train on the valid key and value vectors of (sampled) references.

        Args:
            memory: Sparse memories of the training references.
            seed: Seed of every random draw.

        Returns:
            This object, trained.
        """
        self._check(memory, "fit")
        keys = memory_vectors(memory, part="keys")
        values = memory_vectors(memory, part="values")
        if self.shared:
            self.keys.fit(torch.cat([keys, values]), seed=seed)
        else:
            self.keys.fit(keys, seed=seed)
            self.values.fit(values, seed=seed)
        return self

    def encode(self, memory: SparseMemory) -> QuantizedMemory:
        """Code every key and value vector (invalid slots too, so rows keep a fixed size).

        Args:
            memory: Keys and values `(N, L_mem, H_kv, k, d_h)`.

        Returns:
            The codes, `(N, L_mem, H_kv, k, code_bytes)` each.
        """
        self._check(memory, "encode")
        lead = memory.keys.shape[:-1]
        keys = self.keys.encode(memory.keys.reshape(-1, self.keys.dim))
        values = self.values.encode(memory.values.reshape(-1, self.values.dim))
        return QuantizedMemory(
            keys=keys.view(*lead, -1),
            values=values.view(*lead, -1),
            valid=memory.valid,
            positions=memory.positions,
        )

    def decode(self, codes: QuantizedMemory, *, dtype: torch.dtype = torch.float32) -> SparseMemory:
        """Reconstruct sparse memories from codes.

        Args:
            codes: What `encode` returned.
            dtype: Dtype of the decoded keys and values.

        Returns:
            Sparse memories with keys and values `(N, L_mem, H_kv, k, d_h)`.
        """
        lead = codes.keys.shape[:-1]
        keys = self.keys.decode(codes.keys.reshape(-1, codes.keys.shape[-1]))
        values = self.values.decode(codes.values.reshape(-1, codes.values.shape[-1]))
        return SparseMemory(
            keys=keys.view(*lead, -1).to(dtype),
            values=values.view(*lead, -1).to(dtype),
            valid=codes.valid,
            positions=codes.positions,
        )

    def describe(self, *, legacy: bool = False) -> dict[str, Any]:
        """Both quantizers' settings, JSON-serialisable (for `StoreInfo.quantizer`).

        Args:
            legacy: Name the classes as m3 0.1 did (see `VectorQuantizer.describe`).

        Returns:
            `{"keys": ..., "values": ..., "shared": bool}`.
        """
        return {
            "keys": self.keys.describe(legacy=legacy),
            "values": self.values.describe(legacy=legacy),
            "shared": self.shared,
        }

    def fingerprint(self, *, legacy: bool = False) -> str:
        """A sha256 digest of both quantizers' settings and trained state.

        A store records it (`StoreInfo.quantizer["fingerprint"]`), so that codes are never
        decoded by another quantizer than the one that wrote them.

        Args:
            legacy: The digest m3 0.1 computed (classes named by module path).

        Returns:
            A sha256 hex digest; it changes with any setting or trained value.
        """
        digest = hashlib.sha256(json.dumps(self.describe(legacy=legacy), sort_keys=True).encode())
        for part in (self.keys, self.values):
            for name, tensor in sorted(part._state().items()):
                digest.update(name.encode())
                data = tensor.detach().float().cpu().contiguous()
                digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def matches(self, fingerprint: str | None) -> bool:
        """Whether a recorded fingerprint is this quantizer's (or the one m3 0.1 recorded).

        Args:
            fingerprint: A store's `StoreInfo.quantizer["fingerprint"]`.

        Returns:
            True for `fingerprint()` and for its m3 0.1 form.
        """
        return fingerprint in (self.fingerprint(), self.fingerprint(legacy=True))

    def store_description(self) -> dict[str, Any]:
        """What a store records about its quantizer (`StoreInfo.quantizer`).

        Returns:
            `{"class", "fingerprint", "keys", "values", "shared"}`, JSON-serialisable; the
            `code_bytes` of keys and values decide a store's row layout.
        """
        return {
            "class": type(self).__name__,
            "fingerprint": self.fingerprint(),
            **self.describe(),
        }

    def save(self, path: str | Path | BinaryIO) -> None:
        """Write both quantizers to one file.

        Args:
            path: File path or binary file object.
        """
        torch.save(
            {
                "format": f"{FORMAT}.MemoryQuantizer",
                "version": FORMAT_VERSION,
                "keys": self.keys._payload(),
                "values": None if self.shared else self.values._payload(),
            },
            path,
        )

    @classmethod
    def load(
        cls, path: str | Path | BinaryIO, *, device: torch.device | str = "cpu"
    ) -> MemoryQuantizer:
        """Read what `save` wrote.

        Args:
            path: File path or binary file object.
            device: Where to put the trained state.

        Returns:
            The memory quantizer.
        """
        data = load_file(path, f"{FORMAT}.MemoryQuantizer")
        keys = VectorQuantizer._from_payload(data["keys"], device)
        values = (
            keys
            if data["values"] is None
            else VectorQuantizer._from_payload(data["values"], device)
        )
        return cls(keys, values)
