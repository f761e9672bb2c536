"""Vector quantizers: every stored key/value vector compressed to a few bytes (paper §3.3).

The paper compresses each 80-dim key or value vector of its memory bank to 14 bytes with the
FAISS composite `OPQ20_80,Residual2x14,PQ8x10`, trained on the K/V vectors of uniformly
sampled references and decoded on the host before use: 450,560 bytes per reference become
39,424. This module offers four quantizers behind one small interface, all written in torch
(k-means runs on the device of the training vectors):

| quantizer | short name | code per `d`-dim vector |
|---|---|---|
| `RawQuantizer` | `raw` | the raw bytes of a dtype: `2·d` in bf16 |
| `Int8Quantizer` | `int8` | `d` int8 values + one 2-byte fp16 scale |
| `ProductQuantizer` | `product` | `ceil(subspaces·bits / 8)` bytes |
| `CompositeQuantizer` | `composite` | OPQ rotation, coarse codes, residual PQ: 14 bytes at d = 80 |

A quantizer turns `(n, d)` float vectors into `(n, code_bytes)` uint8 codes of a fixed size
and back, so a store can keep codes in fixed-size rows and decode on read. `describe()`
gives its settings as JSON (for `StoreInfo.quantizer`); `save`/`load` (or `to_bytes`/
`from_bytes`) keep its trained state in one file or blob.

In FAISS, `Residual2x14` in that string builds an inverted multi-index (each half of the
rotated vector gets its own 2^14-centroid codebook), not a two-level residual k-means.
`CompositeQuantizer` builds the same structure by default and offers the residual reading
too.

`MemoryQuantizer` applies quantizers to every key and value vector of a `SparseMemory`. Keys
and values get separately trained quantizers by default, since their distributions differ
(keys carry the rotary rotation, values do not); passing the same quantizer for both trains
one on both.

```python
quantizer = MemoryQuantizer(CompositeQuantizer(80))       # keys and values: the paper's codec
quantizer.fit(sample)                                      # SparseMemory of sampled references
codes = quantizer.encode(memory)                           # QuantizedMemory: uint8 codes
memory_back = quantizer.decode(codes, dtype=torch.bfloat16)
quantizer.save("bank.quantizer")
```

Codes are packed as one little-endian bit stream per group of fields: field `j` of width `b`
occupies bits `j·b … j·b + b − 1`, bit `i` of the stream being bit `i mod 8` of byte
`i div 8` (`pack_codes`, `unpack_codes`).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import Tensor

from m3.core.errors import UserError
from m3.core.memories import SparseMemory

FORMAT = "m3.quantize"
FORMAT_VERSION = 1
#: elements of one block of the distance matrix (4 MiB in float32): bounds k-means' memory
_BLOCK_ELEMENTS = 1 << 20
#: rows packed or unpacked at a time
_PACK_ROWS = 1 << 16
#: widest code field: 2^16 centroids per codebook
MAX_BITS = 16
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FloatDtype = Literal["float32", "bfloat16", "float16"]
ScaleDtype = Literal["float16", "bfloat16", "float32"]


def _check_int(owner: str, name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{owner}: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"at least {low}" if high is None else f"in {low}..{high}"
        raise UserError(f"{owner}: {name} must be {allowed}, got {value}")
    return value


def _check_choice(owner: str, name: str, value: object, choices: dict[str, Any]) -> str:
    if value not in choices:
        raise UserError(f"{owner}: {name} must be one of {sorted(choices)}, got {value!r}")
    return str(value)


# ------------------------------------------------------------------------------- bit packing
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
    bits = _check_int("pack_codes", "bits", bits, low=1, high=MAX_BITS)
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
    bits = _check_int("unpack_codes", "bits", bits, low=1, high=MAX_BITS)
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


# ----------------------------------------------------------------------------------- k-means
def _assign(vectors: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every vector, in blocks that bound memory.

    Args:
        vectors: `(G, n, d)`: `G` independent problems (PQ's subspaces) of `n` vectors.
        centroids: `(G, K, d)`.

    Returns:
        `(G, n)` long indices and `(G, n)` squared distances.
    """
    groups, count, _ = vectors.shape
    size = centroids.shape[1]
    norms = (centroids * centroids).sum(-1)[:, None, :]
    transposed = centroids.transpose(1, 2)
    index = torch.empty(groups, count, dtype=torch.long, device=vectors.device)
    distance = torch.empty(groups, count, dtype=vectors.dtype, device=vectors.device)
    step = max(1, _BLOCK_ELEMENTS // (groups * size))
    for start in range(0, count, step):
        block = vectors[:, start : start + step]
        # ||x − c||² = ||x||² − 2 x·c + ||c||²; ||x||² does not change the argmin
        partial = torch.baddbmm(norms, block, transposed, alpha=-2.0)
        best = partial.min(dim=-1)
        index[:, start : start + step] = best.indices
        distance[:, start : start + step] = (best.values + (block * block).sum(-1)).clamp_(min=0)
    return index, distance


def _sample(vectors: Tensor, limit: int, generator: torch.Generator, *, dim: int = 0) -> Tensor:
    """At most `limit` of the vectors along `dim`, drawn without replacement."""
    count = vectors.shape[dim]
    if count <= limit:
        return vectors
    pick = torch.randperm(count, generator=generator)[:limit].to(vectors.device)
    return vectors.index_select(dim, pick)


def kmeans(
    vectors: Tensor,
    k: int,
    *,
    iterations: int = 25,
    seed: int = 0,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
) -> Tensor:
    """Lloyd's k-means in torch, on the device of `vectors`.

    Starts from `k` distinct training vectors drawn with a seeded generator (or from `init`),
    then alternates assignment and mean updates. A centroid left without vectors is moved to
    the vector currently worst served (the largest distance to its centroid), so no code is
    wasted. Several independent problems of equal size are solved together when `vectors`
    has a leading group dimension (the subspaces of a product quantizer).

    Args:
        vectors: `(n, d)` training vectors, or `(G, n, d)` for `G` problems at once.
        k: Number of centroids, at most `n`.
        iterations: Lloyd iterations.
        seed: Seed of the initial draw when `generator` is None.
        generator: A CPU generator to draw from (overrides `seed`).
        init: `(k, d)` or `(G, k, d)` starting centroids instead of a draw.

    Returns:
        `(k, d)` or `(G, k, d)` float32 centroids.
    """
    single = vectors.dim() == 2
    data = (vectors[None] if single else vectors).float()
    groups, count, dim = data.shape
    k = _check_int("kmeans", "k", k, low=1)
    iterations = _check_int("kmeans", "iterations", iterations, low=0)
    if count < k:
        raise UserError(f"kmeans: {k} centroids need at least {k} training vectors, got {count}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    if init is None:
        pick = torch.randperm(count, generator=generator)[:k].to(data.device)
        centroids = data[:, pick].clone()
    else:
        centroids = (init[None] if single else init).to(data).clone()
    offsets = (torch.arange(groups, device=data.device) * k)[:, None]
    flat = data.reshape(groups * count, dim)
    for _ in range(iterations):
        index, distance = _assign(data, centroids)
        slots = (index + offsets).flatten()
        sums = torch.zeros(groups * k, dim, device=data.device).index_add_(0, slots, flat)
        counts = torch.bincount(slots, minlength=groups * k).view(groups, k)
        means = sums.view(groups, k, dim) / counts.clamp(min=1)[..., None].to(sums.dtype)
        centroids = torch.where(counts[..., None] > 0, means, centroids)
        for group in (counts == 0).any(dim=1).nonzero().flatten().tolist():
            empty = (counts[group] == 0).nonzero().flatten()
            worst = distance[group].topk(len(empty)).indices
            centroids[group, empty] = data[group, worst]
    return centroids[0] if single else centroids


# ---------------------------------------------------------------------- product quantization
def _subspaces(vectors: Tensor, count: int) -> Tensor:
    """`(n, d)` -> `(M, n, d / M)`."""
    return vectors.reshape(vectors.shape[0], count, vectors.shape[1] // count).transpose(0, 1)


def _pq_assign(vectors: Tensor, codebooks: Tensor) -> Tensor:
    """`(n, d)` vectors, `(M, K, d / M)` codebooks -> `(n, M)` long indices."""
    index, _ = _assign(_subspaces(vectors, codebooks.shape[0]).contiguous(), codebooks)
    return index.T


def _pq_decode(index: Tensor, codebooks: Tensor) -> Tensor:
    """`(n, M)` indices, `(M, K, d / M)` codebooks -> `(n, d)` vectors."""
    spaces, size, width = codebooks.shape
    # one index_select over the stacked codebooks: several times faster than a 2-D gather
    offsets = torch.arange(spaces, device=codebooks.device) * size
    rows = (index + offsets).flatten()
    return codebooks.reshape(spaces * size, width).index_select(0, rows).view(-1, spaces * width)


def _pq_train(
    vectors: Tensor,
    subspaces: int,
    size: int,
    *,
    iterations: int,
    generator: torch.Generator,
    points_per_centroid: int,
    init: Tensor | None = None,
) -> Tensor:
    """Codebooks `(M, K, d / M)` of a product quantizer, trained on a sample of `vectors`."""
    sample = _sample(vectors, size * points_per_centroid, generator)
    parts = _subspaces(sample, subspaces).contiguous()
    return kmeans(parts, size, iterations=iterations, generator=generator, init=init)


def _train_rotation(
    vectors: Tensor,
    *,
    subspaces: int,
    bits: int,
    iterations: int,
    pq_iterations: int,
    first_pq_iterations: int,
    generator: torch.Generator,
) -> Tensor:
    """OPQ's non-parametric rotation: alternate PQ training and orthogonal Procrustes.

    Minimises `‖X R − PQ(X R)‖²` over orthogonal `R` (Ge et al., 2013): with the codebooks
    fixed, the best `R` is `U Vᵀ` from the SVD `Xᵀ Ŷ = U Σ Vᵀ`, where `Ŷ` are the current
    reconstructions; with `R` fixed, a few k-means iterations (warm-started) refit the codebooks.
    It starts from a random rotation drawn from `generator`.

    Args:
        vectors: `(n, d)` training vectors (already sampled).
        subspaces: Subspaces of the PQ the rotation is optimised for.
        bits: Bits per subspace of that PQ.
        iterations: Alternations.
        pq_iterations: k-means iterations per alternation.
        first_pq_iterations: k-means iterations of the first codebooks.
        generator: CPU generator.

    Returns:
        `(d, d)` float32 orthogonal matrix; rotated vectors are `x @ R`.
    """
    dim = vectors.shape[1]
    # start from a random rotation (as FAISS does): it spreads variance over the subspaces
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    rotation, upper = torch.linalg.qr(gaussian)
    rotation = (rotation * upper.diagonal().sign()).to(vectors.device)
    codebooks: Tensor | None = None
    for _ in range(iterations):
        rotated = (vectors.double() @ rotation).float()
        codebooks = kmeans(
            _subspaces(rotated, subspaces).contiguous(),
            1 << bits,
            iterations=first_pq_iterations if codebooks is None else pq_iterations,
            generator=generator,
            init=codebooks,
        )
        approx = _pq_decode(_pq_assign(rotated, codebooks), codebooks)
        left, _, right = torch.linalg.svd(vectors.double().T @ approx.double())
        rotation = left @ right
    return rotation.float()


# ------------------------------------------------------------------------------ quantizers
class _BytesRoundTrip:
    """`to_bytes`/`from_bytes` for a class that has `save(file)` and `load(file, device=)`."""

    def to_bytes(self) -> bytes:
        """What `save` writes, as bytes (to keep inside another file, e.g. a store's)."""
        buffer = io.BytesIO()
        self.save(buffer)  # type: ignore[attr-defined]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, device: torch.device | str = "cpu") -> Any:
        """Inverse of `to_bytes`.

        Args:
            data: The bytes.
            device: Where to put the trained state.

        Returns:
            The quantizer.
        """
        return cls.load(io.BytesIO(data), device=device)  # type: ignore[attr-defined]


class VectorQuantizer(_BytesRoundTrip, ABC):
    """Compresses `d`-dim float vectors to fixed-size byte codes, and back.

    Subclasses define their settings in the constructor (plain keyword arguments: recipes
    build them by name), `code_bytes`, and the hooks `_fit`, `_encode`, `_decode`,
    `_state`, `_load_state`; this class checks inputs, moves tensors between devices and
    saves and loads.

    Args:
        dim: Dimension `d` of the vectors.
    """

    def __init__(self, dim: int) -> None:
        self.dim = _check_int(type(self).__name__, "dim", dim, low=1)
        self.device = torch.device("cpu")

    # --- what subclasses provide
    @property
    @abstractmethod
    def code_bytes(self) -> int:
        """Bytes of the code of one vector."""

    @abstractmethod
    def init_args(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-serialisable: `type(self)(**init_args())`."""

    @property
    def fitted(self) -> bool:
        """Whether the quantizer is trained (always, for those that need no training)."""
        return True

    def _fit(self, vectors: Tensor, generator: torch.Generator) -> None:
        """Train on `(n, d)` float32 vectors (on their device); nothing to train by default."""

    @abstractmethod
    def _encode(self, vectors: Tensor) -> Tensor:
        """`(n, d)` float32 on `self.device` -> `(n, code_bytes)` uint8."""

    @abstractmethod
    def _decode(self, codes: Tensor) -> Tensor:
        """`(n, code_bytes)` uint8 on `self.device` -> `(n, d)` float32."""

    def _state(self) -> dict[str, Tensor]:
        """Trained tensors by name (empty when untrained or stateless)."""
        return {}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        """Restore what `_state` returned."""

    # --- the public interface
    def _check_vectors(self, vectors: Tensor, what: str) -> None:
        if not isinstance(vectors, Tensor) or vectors.dim() != 2:
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors)
            raise UserError(f"{type(self).__name__}.{what}: vectors must be (n, d), got {shape}")
        if vectors.shape[1] != self.dim:
            raise UserError(
                f"{type(self).__name__}.{what}: vectors have dim {vectors.shape[1]}, "
                f"the quantizer has dim {self.dim}"
            )
        if not vectors.is_floating_point():
            raise UserError(
                f"{type(self).__name__}.{what}: vectors must be float, got {vectors.dtype}"
            )

    def _check_fitted(self, what: str) -> None:
        if not self.fitted:
            raise UserError(
                f"{type(self).__name__}.{what}: the quantizer is not trained: call fit first"
            )

    def fit(self, vectors: Tensor, *, seed: int = 0) -> VectorQuantizer:
        """Train on sample vectors, on their device (a GPU when they are on one).

        Args:
            vectors: `(n, d)` float training vectors, e.g. the key vectors of uniformly
                sampled references (`MemoryQuantizer.fit` gathers them).
            seed: Seed of every random draw, so that training is reproducible.

        Returns:
            This quantizer, trained.

        Raises:
            UserError: For vectors of another dimension, non-finite values, or fewer vectors
                than the quantizer has centroids.
        """
        self._check_vectors(vectors, "fit")
        if not torch.isfinite(vectors).all():
            raise UserError(f"{type(self).__name__}.fit: training vectors hold NaN or infinity")
        self.device = vectors.device
        self._fit(vectors.float(), torch.Generator().manual_seed(seed))
        return self

    def encode(self, vectors: Tensor) -> Tensor:
        """Compress vectors to codes.

        Args:
            vectors: `(n, d)` float vectors.

        Returns:
            `(n, code_bytes)` uint8 codes, on the device of `vectors`.

        Raises:
            UserError: Before `fit`, or for vectors of another dimension.
        """
        self._check_fitted("encode")
        self._check_vectors(vectors, "encode")
        return self._encode(vectors.to(self.device)).to(vectors.device)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruct vectors from codes.

        Args:
            codes: `(n, code_bytes)` uint8 codes.

        Returns:
            `(n, d)` float32 vectors, on the device of `codes`.

        Raises:
            UserError: Before `fit`, or for codes of another size or dtype.
        """
        self._check_fitted("decode")
        if codes.dim() != 2 or codes.shape[1] != self.code_bytes or codes.dtype != torch.uint8:
            raise UserError(
                f"{type(self).__name__}.decode: codes must be uint8 (n, {self.code_bytes}), "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        return self._decode(codes.to(self.device)).to(codes.device)

    def reconstruct(self, vectors: Tensor) -> Tensor:
        """`decode(encode(vectors))`: what a reader of quantized memories sees.

        Args:
            vectors: `(n, d)` float vectors.

        Returns:
            `(n, d)` float32 reconstructions.
        """
        return self.decode(self.encode(vectors))

    def to(self, device: torch.device | str) -> VectorQuantizer:
        """Move the trained state to a device, where `encode` and `decode` then compute.

        Args:
            device: Target device.

        Returns:
            This quantizer.
        """
        self.device = torch.device(device)
        state = self._state()
        if state:
            self._load_state({name: t.to(self.device) for name, t in state.items()})
        return self

    def describe(self) -> dict[str, Any]:
        """The quantizer's class and settings, JSON-serialisable (e.g. for `StoreInfo`).

        Returns:
            `{"class_path", "init_args", "code_bytes"}`; `from_description` rebuilds an
            untrained quantizer from it.
        """
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": self.init_args(),
            "code_bytes": self.code_bytes,
        }

    @staticmethod
    def from_description(description: dict[str, Any]) -> VectorQuantizer:
        """An untrained quantizer with the settings `describe()` gave.

        Args:
            description: What `describe()` returned.

        Returns:
            The quantizer (not trained).

        Raises:
            UserError: When the class cannot be found or is not a `VectorQuantizer`.
        """
        path = str(description.get("class_path", ""))
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as error:
            raise UserError(f"unknown quantizer class {path!r}: {error}") from None
        if not (isinstance(cls, type) and issubclass(cls, VectorQuantizer)):
            raise UserError(f"{path!r} is not a VectorQuantizer")
        return cls(**description.get("init_args", {}))

    def _payload(self) -> dict[str, Any]:
        return {
            "description": json.dumps(self.describe(), sort_keys=True),
            "state": {name: t.detach().cpu() for name, t in self._state().items()},
        }

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], device: torch.device | str) -> VectorQuantizer:
        quantizer = VectorQuantizer.from_description(json.loads(payload["description"]))
        if not isinstance(quantizer, cls):
            raise UserError(f"the file holds a {type(quantizer).__name__}, not a {cls.__name__}")
        if payload["state"]:
            quantizer._load_state(payload["state"])
        return quantizer.to(device)

    def save(self, path: str | Path | BinaryIO) -> None:
        """Write the settings and trained state to one file (`torch.save` of tensors + JSON).

        Args:
            path: File path or binary file object.
        """
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, **self._payload()}, path)

    @classmethod
    def load(cls, path: str | Path | BinaryIO, *, device: torch.device | str = "cpu") -> Any:
        """Read a quantizer that `save` wrote.

        Args:
            path: File path or binary file object.
            device: Where to put the trained state.

        Returns:
            The quantizer, of the class that was saved (`cls` or a subclass of it).

        Raises:
            UserError: For a file that is not a saved quantizer or holds another class.
        """
        data = _load_file(path, FORMAT)
        return cls._from_payload(data, device)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


def _load_file(path: str | Path | BinaryIO, fmt: str) -> dict[str, Any]:
    where = path if isinstance(path, (str, Path)) else "data"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{where}: no such quantizer file") from None
    except Exception as error:  # any unreadable file is the user's input
        raise UserError(f"{where} is not a saved quantizer: {error}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{where} is not a saved {fmt} file")
    if data.get("version") != FORMAT_VERSION:
        raise UserError(f"{where}: format version {data.get('version')} is not supported")
    return data


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
        self.dtype = _check_choice("RawQuantizer", "dtype", dtype, _FLOAT_DTYPES)

    @property
    def code_bytes(self) -> int:
        """`d × itemsize` of the dtype."""
        return self.dim * _FLOAT_DTYPES[self.dtype].itemsize

    def init_args(self) -> dict[str, Any]:
        """See `VectorQuantizer.init_args`."""
        return {"dim": self.dim, "dtype": self.dtype}

    def encode(self, vectors: Tensor) -> Tensor:
        """The raw bytes of `vectors` cast to the dtype, `(n, d)` -> `(n, code_bytes)` uint8."""
        self._check_vectors(vectors, "encode")
        return self._encode(vectors)

    def _encode(self, vectors: Tensor) -> Tensor:
        return vectors.to(_FLOAT_DTYPES[self.dtype]).contiguous().view(torch.uint8)

    def _decode(self, codes: Tensor) -> Tensor:
        return codes.contiguous().view(_FLOAT_DTYPES[self.dtype]).float()


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
        self.scale_dtype = _check_choice("Int8Quantizer", "scale_dtype", scale_dtype, _FLOAT_DTYPES)

    @property
    def code_bytes(self) -> int:
        """`d` + the scale's bytes."""
        return self.dim + _FLOAT_DTYPES[self.scale_dtype].itemsize

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
        dtype = _FLOAT_DTYPES[self.scale_dtype]
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
        scale = codes[:, self.dim :].contiguous().view(_FLOAT_DTYPES[self.scale_dtype]).float()
        return values * scale


class ProductQuantizer(VectorQuantizer):
    """Product quantization: `d` split into `M` subspaces, each coded by its own k-means.

    Each subspace of `d / M` dimensions has a codebook of `2^bits` centroids trained by
    k-means on the training vectors' parts; a vector's code is the index of the nearest
    centroid in every subspace, packed into `ceil(M · bits / 8)` bytes (bit widths that are
    not multiples of 8, e.g. the paper's 10, share bytes).

    Args:
        dim: Dimension `d`, divisible by `subspaces`.
        subspaces: Number of subspaces `M`.
        bits: Bits per subspace code (`2^bits` centroids), 1 to 16.
        iterations: k-means iterations.
        points_per_centroid: Training vectors drawn per centroid at most (FAISS's 256):
            a larger training set is subsampled, which bounds training time.
    """

    def __init__(
        self,
        dim: int,
        *,
        subspaces: int = 8,
        bits: int = 8,
        iterations: int = 25,
        points_per_centroid: int = 256,
    ) -> None:
        super().__init__(dim)
        owner = "ProductQuantizer"
        self.subspaces = _check_int(owner, "subspaces", subspaces, low=1)
        if dim % subspaces:
            raise UserError(f"{owner}: dim {dim} is not divisible by subspaces={subspaces}")
        self.bits = _check_int(owner, "bits", bits, low=1, high=MAX_BITS)
        self.iterations = _check_int(owner, "iterations", iterations, low=0)
        self.points_per_centroid = _check_int(
            owner, "points_per_centroid", points_per_centroid, low=1
        )
        self.codebooks: Tensor | None = None

    @property
    def code_bytes(self) -> int:
        """`ceil(subspaces · bits / 8)`."""
        return packed_bytes(self.subspaces, self.bits)

    @property
    def fitted(self) -> bool:
        """Whether the codebooks are trained."""
        return self.codebooks is not None

    def init_args(self) -> dict[str, Any]:
        """See `VectorQuantizer.init_args`."""
        return {
            "dim": self.dim,
            "subspaces": self.subspaces,
            "bits": self.bits,
            "iterations": self.iterations,
            "points_per_centroid": self.points_per_centroid,
        }

    def _fit(self, vectors: Tensor, generator: torch.Generator) -> None:
        size = 1 << self.bits
        if vectors.shape[0] < size:
            raise UserError(
                f"ProductQuantizer.fit: bits={self.bits} means {size} centroids per subspace, "
                f"which needs at least {size} training vectors, got {vectors.shape[0]}"
            )
        self.codebooks = _pq_train(
            vectors,
            self.subspaces,
            size,
            iterations=self.iterations,
            generator=generator,
            points_per_centroid=self.points_per_centroid,
        )

    def assign(self, vectors: Tensor) -> Tensor:
        """Unpacked codes: the nearest centroid per subspace.

        Args:
            vectors: `(n, d)` float vectors.

        Returns:
            `(n, subspaces)` long centroid indices.
        """
        self._check_fitted("assign")
        self._check_vectors(vectors, "assign")
        assert self.codebooks is not None
        return _pq_assign(vectors.to(self.device).float(), self.codebooks).to(vectors.device)

    def _encode(self, vectors: Tensor) -> Tensor:
        assert self.codebooks is not None
        return pack_codes(_pq_assign(vectors.float(), self.codebooks), self.bits)

    def _decode(self, codes: Tensor) -> Tensor:
        assert self.codebooks is not None
        return _pq_decode(unpack_codes(codes, self.bits, self.subspaces), self.codebooks)

    def _state(self) -> dict[str, Tensor]:
        return {} if self.codebooks is None else {"codebooks": self.codebooks}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        codebooks = state["codebooks"]
        want = (self.subspaces, 1 << self.bits, self.dim // self.subspaces)
        if tuple(codebooks.shape) != want:
            raise UserError(
                f"ProductQuantizer: saved codebooks are {tuple(codebooks.shape)}, expected {want}"
            )
        self.codebooks = codebooks.float()


class CompositeQuantizer(VectorQuantizer):
    """The paper's codec: OPQ rotation, a coarse quantizer, then PQ of the residual.

    FAISS writes the paper's settings `OPQ20_80,Residual2x14,PQ8x10` (`factory_string`),
    which `faiss.index_factory` builds as an `Index2Layer`. Encoding a vector `x`:

    1. **Rotation** (OPQ): `y = x R` with a learned orthogonal `d × d` matrix `R`. `R` is
       optimised for a PQ of `opq_subspaces` subspaces × `opq_bits` bits ("OPQ20": 20
       subspaces of 4 dims, 8 bits as in FAISS), whose codes are never stored: it only
       shapes the rotation so that `y`'s variance suits product codes. Rotation is lossless.
    2. **Coarse quantizer**, `coarse_codes` codes of `coarse_bits` bits ("2x14"):
       - `"multi_index"` (default, what FAISS builds for `Residual2x14`): an inverted
         multi-index, i.e. `y` split into `coarse_codes` halves (40 dims each), each coded by
         its own k-means of `2^coarse_bits` centroids: `2^28` coarse cells in all;
       - `"residual"`: `coarse_codes` levels of full-dimension k-means, each coding what the
         previous ones left (greedy nearest centroid per level).

       The coarse codes take `ceil(codes · bits / 8)` bytes: 2 × 14 bits = 4 bytes, as FAISS
       stores the cell number of a `2^28`-cell index.
    3. **PQ** of the residual `y − coarse(y)`: `pq_subspaces` × `pq_bits` bits (8 × 10 bits =
       10 bytes).

    A code is the coarse bytes followed by the PQ bytes: 14 bytes per 80-dim vector at the
    paper's settings. Decoding adds the coarse and PQ reconstructions and rotates back with
    `Rᵀ`. Training needs at least `2^coarse_bits` vectors (16,384 at paper settings; FAISS
    suggests 39 or more per centroid).

    Args:
        dim: Dimension `d` (the paper: 80).
        opq_subspaces: Subspaces of the PQ the rotation is optimised for; divides `dim`.
            None for no rotation (`R = I`).
        opq_bits: Bits per subspace of that PQ.
        opq_iterations: Alternations of PQ training and Procrustes (FAISS: 50); each runs 4
            k-means iterations, warm-started.
        coarse: "multi_index" (FAISS's) or "residual".
        coarse_codes: Number of coarse codes: subvectors of the multi-index (dividing `dim`)
            or levels of the residual quantizer.
        coarse_bits: Bits per coarse code (`2^coarse_bits` centroids).
        pq_subspaces: Subspaces of the residual PQ; divides `dim`.
        pq_bits: Bits per residual PQ subspace.
        iterations: k-means iterations of every codebook (and of OPQ's first one).
        points_per_centroid: Training vectors drawn per centroid at most (FAISS's 256).
    """

    def __init__(
        self,
        dim: int,
        *,
        opq_subspaces: int | None = 20,
        opq_bits: int = 8,
        opq_iterations: int = 50,
        coarse: Literal["multi_index", "residual"] = "multi_index",
        coarse_codes: int = 2,
        coarse_bits: int = 14,
        pq_subspaces: int = 8,
        pq_bits: int = 10,
        iterations: int = 25,
        points_per_centroid: int = 256,
    ) -> None:
        super().__init__(dim)
        owner = "CompositeQuantizer"
        if opq_subspaces is not None:
            _check_int(owner, "opq_subspaces", opq_subspaces, low=1)
            if dim % opq_subspaces:
                raise UserError(
                    f"{owner}: dim {dim} is not divisible by opq_subspaces={opq_subspaces}"
                )
        self.opq_subspaces = opq_subspaces
        self.opq_bits = _check_int(owner, "opq_bits", opq_bits, low=1, high=MAX_BITS)
        self.opq_iterations = _check_int(owner, "opq_iterations", opq_iterations, low=1)
        self.coarse = _check_choice(
            owner, "coarse", coarse, {"multi_index": None, "residual": None}
        )
        self.coarse_codes = _check_int(owner, "coarse_codes", coarse_codes, low=0)
        if coarse == "multi_index" and coarse_codes and dim % coarse_codes:
            raise UserError(
                f"{owner}: dim {dim} is not divisible by coarse_codes={coarse_codes} "
                "(the multi-index splits vectors into that many parts)"
            )
        self.coarse_bits = _check_int(owner, "coarse_bits", coarse_bits, low=1, high=MAX_BITS)
        self.pq_subspaces = _check_int(owner, "pq_subspaces", pq_subspaces, low=1)
        if dim % pq_subspaces:
            raise UserError(f"{owner}: dim {dim} is not divisible by pq_subspaces={pq_subspaces}")
        self.pq_bits = _check_int(owner, "pq_bits", pq_bits, low=1, high=MAX_BITS)
        self.iterations = _check_int(owner, "iterations", iterations, low=0)
        self.points_per_centroid = _check_int(
            owner, "points_per_centroid", points_per_centroid, low=1
        )
        self.rotation: Tensor | None = None
        self.coarse_codebooks: Tensor | None = None
        self.codebooks: Tensor | None = None

    @property
    def coarse_bytes(self) -> int:
        """Bytes of the coarse codes: `ceil(coarse_codes · coarse_bits / 8)`."""
        return packed_bytes(self.coarse_codes, self.coarse_bits)

    @property
    def code_bytes(self) -> int:
        """Coarse bytes + `ceil(pq_subspaces · pq_bits / 8)`: 4 + 10 = 14 at paper settings."""
        return self.coarse_bytes + packed_bytes(self.pq_subspaces, self.pq_bits)

    @property
    def factory_string(self) -> str | None:
        """The FAISS `index_factory` string of the same structure (None for residual coarse)."""
        if self.coarse == "residual" and self.coarse_codes:
            return None
        parts = []
        if self.opq_subspaces is not None:
            parts.append(f"OPQ{self.opq_subspaces}_{self.dim}")
        if self.coarse_codes:
            parts.append(f"Residual{self.coarse_codes}x{self.coarse_bits}")
        parts.append(f"PQ{self.pq_subspaces}x{self.pq_bits}")
        return ",".join(parts)

    @property
    def fitted(self) -> bool:
        """Whether rotation and codebooks are trained."""
        return self.codebooks is not None

    def init_args(self) -> dict[str, Any]:
        """See `VectorQuantizer.init_args`."""
        return {
            "dim": self.dim,
            "opq_subspaces": self.opq_subspaces,
            "opq_bits": self.opq_bits,
            "opq_iterations": self.opq_iterations,
            "coarse": self.coarse,
            "coarse_codes": self.coarse_codes,
            "coarse_bits": self.coarse_bits,
            "pq_subspaces": self.pq_subspaces,
            "pq_bits": self.pq_bits,
            "iterations": self.iterations,
            "points_per_centroid": self.points_per_centroid,
        }

    def describe(self) -> dict[str, Any]:
        """See `VectorQuantizer.describe`; adds the FAISS `factory` string where one exists."""
        description = super().describe()
        if self.factory_string is not None:
            description["factory"] = self.factory_string
        return description

    def _coarse_shape(self) -> tuple[int, int, int]:
        size = 1 << self.coarse_bits
        if self.coarse == "multi_index":
            return (self.coarse_codes, size, self.dim // max(1, self.coarse_codes))
        return (self.coarse_codes, size, self.dim)

    def _fit(self, vectors: Tensor, generator: torch.Generator) -> None:
        use_opq = self.opq_subspaces is not None
        sizes = [1 << self.pq_bits]
        sizes += [1 << self.coarse_bits] if self.coarse_codes else []
        sizes += [1 << self.opq_bits] if use_opq else []
        if vectors.shape[0] < max(sizes):
            raise UserError(
                f"CompositeQuantizer.fit: codebooks of {max(sizes)} centroids need at least "
                f"{max(sizes)} training vectors, got {vectors.shape[0]}"
            )
        if use_opq:
            assert self.opq_subspaces is not None
            rotation = _train_rotation(
                _sample(vectors, (1 << self.opq_bits) * self.points_per_centroid, generator),
                subspaces=self.opq_subspaces,
                bits=self.opq_bits,
                iterations=self.opq_iterations,
                pq_iterations=4,
                first_pq_iterations=self.iterations,
                generator=generator,
            )
        else:
            rotation = torch.eye(self.dim, device=vectors.device)
        rotated = vectors @ rotation
        size = 1 << self.coarse_bits
        if not self.coarse_codes:
            coarse = torch.zeros(self._coarse_shape(), device=vectors.device)
        elif self.coarse == "multi_index":
            coarse = _pq_train(
                rotated,
                self.coarse_codes,
                size,
                iterations=self.iterations,
                generator=generator,
                points_per_centroid=self.points_per_centroid,
            )
        else:
            levels, residual = [], rotated
            for _ in range(self.coarse_codes):
                sample = _sample(residual, size * self.points_per_centroid, generator)
                centroids = kmeans(sample, size, iterations=self.iterations, generator=generator)
                index, _ = _assign(residual[None], centroids[None])
                residual = residual - centroids[index[0]]
                levels.append(centroids)
            coarse = torch.stack(levels)
        self.rotation, self.coarse_codebooks = rotation, coarse
        residual = rotated - self._coarse_decode(self._coarse_assign(rotated))
        self.codebooks = _pq_train(
            residual,
            self.pq_subspaces,
            1 << self.pq_bits,
            iterations=self.iterations,
            generator=generator,
            points_per_centroid=self.points_per_centroid,
        )

    def _coarse_assign(self, rotated: Tensor) -> Tensor:
        """`(n, d)` rotated vectors -> `(n, coarse_codes)` long coarse indices."""
        coarse = self.coarse_codebooks
        assert coarse is not None
        if not self.coarse_codes:
            return torch.zeros(rotated.shape[0], 0, dtype=torch.long, device=rotated.device)
        if self.coarse == "multi_index":
            return _pq_assign(rotated, coarse)
        levels, residual = [], rotated
        for centroids in coarse:
            index, _ = _assign(residual[None], centroids[None])
            residual = residual - centroids[index[0]]
            levels.append(index[0])
        return torch.stack(levels, dim=1)

    def _coarse_decode(self, index: Tensor) -> Tensor:
        """`(n, coarse_codes)` coarse indices -> `(n, d)` coarse reconstructions."""
        coarse = self.coarse_codebooks
        assert coarse is not None
        if not self.coarse_codes:
            return torch.zeros(index.shape[0], self.dim, device=coarse.device)
        if self.coarse == "multi_index":
            return _pq_decode(index, coarse)
        levels = torch.arange(self.coarse_codes, device=coarse.device)
        return coarse[levels[None, :], index].sum(dim=1)

    def _encode(self, vectors: Tensor) -> Tensor:
        assert self.rotation is not None and self.codebooks is not None
        rotated = vectors.float() @ self.rotation
        index = self._coarse_assign(rotated)
        residual = rotated - self._coarse_decode(index)
        fine = pack_codes(_pq_assign(residual, self.codebooks), self.pq_bits)
        if not self.coarse_codes:
            return fine
        return torch.cat([pack_codes(index, self.coarse_bits), fine], dim=1)

    def _decode(self, codes: Tensor) -> Tensor:
        assert self.rotation is not None and self.codebooks is not None
        split = self.coarse_bytes
        fine = unpack_codes(codes[:, split:].contiguous(), self.pq_bits, self.pq_subspaces)
        rotated = _pq_decode(fine, self.codebooks)
        if self.coarse_codes:
            index = unpack_codes(codes[:, :split].contiguous(), self.coarse_bits, self.coarse_codes)
            rotated = rotated + self._coarse_decode(index)
        return rotated @ self.rotation.T

    def _state(self) -> dict[str, Tensor]:
        if self.codebooks is None:
            return {}
        assert self.rotation is not None and self.coarse_codebooks is not None
        return {
            "rotation": self.rotation,
            "coarse": self.coarse_codebooks,
            "codebooks": self.codebooks,
        }

    def _load_state(self, state: dict[str, Tensor]) -> None:
        shapes = {
            "rotation": (self.dim, self.dim),
            "coarse": self._coarse_shape(),
            "codebooks": (self.pq_subspaces, 1 << self.pq_bits, self.dim // self.pq_subspaces),
        }
        for name, want in shapes.items():
            if tuple(state[name].shape) != want:
                raise UserError(
                    f"CompositeQuantizer: saved {name} is {tuple(state[name].shape)}, "
                    f"expected {want}"
                )
        self.rotation = state["rotation"].float()
        self.coarse_codebooks = state["coarse"].float()
        self.codebooks = state["codebooks"].float()


# ---------------------------------------------------------------------------- whole memories
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


class MemoryQuantizer(_BytesRoundTrip):
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

    def describe(self) -> dict[str, Any]:
        """Both quantizers' settings, JSON-serialisable (for `StoreInfo.quantizer`).

        Returns:
            `{"keys": ..., "values": ..., "shared": bool}`.
        """
        return {
            "keys": self.keys.describe(),
            "values": self.values.describe(),
            "shared": self.shared,
        }

    def fingerprint(self) -> str:
        """A sha256 digest of both quantizers' settings and trained state.

        A store records it (`StoreInfo.quantizer["fingerprint"]`), so that codes are never
        decoded by another quantizer than the one that wrote them.

        Returns:
            A sha256 hex digest; it changes with any setting or trained value.
        """
        digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for part in (self.keys, self.values):
            for name, tensor in sorted(part._state().items()):
                digest.update(name.encode())
                data = tensor.detach().float().cpu().contiguous()
                digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def store_description(self) -> dict[str, Any]:
        """What a store records about its quantizer (`StoreInfo.quantizer`).

        Returns:
            `{"class", "fingerprint", "keys", "values", "shared"}`, JSON-serialisable; the
            `code_bytes` of keys and values decide a store's row layout.
        """
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
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
        data = _load_file(path, f"{FORMAT}.MemoryQuantizer")
        keys = VectorQuantizer._from_payload(data["keys"], device)
        values = (
            keys
            if data["values"] is None
            else VectorQuantizer._from_payload(data["values"], device)
        )
        return cls(keys, values)


def relative_error(vectors: Tensor, approx: Tensor) -> float:
    """Relative squared error `Σ‖x − x̂‖² / Σ‖x‖²` of reconstructions.

    Args:
        vectors: `(n, d)` original vectors.
        approx: `(n, d)` reconstructions.

    Returns:
        The error (0 = exact; 1 = as bad as reconstructing zeros).
    """
    vectors, approx = vectors.double(), approx.double()
    total = float((vectors * vectors).sum())
    return float(((vectors - approx) ** 2).sum()) / total if total else 0.0


__all__ = [
    "CompositeQuantizer",
    "Int8Quantizer",
    "MemoryQuantizer",
    "NoQuantizer",
    "ProductQuantizer",
    "QuantizedMemory",
    "RawQuantizer",
    "VectorQuantizer",
    "kmeans",
    "memory_vectors",
    "pack_codes",
    "packed_bytes",
    "relative_error",
    "unpack_codes",
]
