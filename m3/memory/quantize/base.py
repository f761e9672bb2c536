"""The interface every vector quantizer implements, and the file a trained one is saved in.

A `VectorQuantizer` turns `(n, d)` float vectors into `(n, code_bytes)` uint8 codes of a
fixed size and back. Subclasses define their settings in the constructor, `code_bytes`, and
the hooks `_fit`, `_encode`, `_decode`, `_state` and `_load_state`; the base class checks
inputs, moves tensors between devices, and saves and loads: `save` writes one
`torch.save` file of format `FORMAT` (its settings as JSON, its trained tensors), which
`load` reads back whatever subclass wrote it.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from m3.core import registry
from m3.core.checks import check_int
from m3.core.errors import UserError

#: The format name in every quantizer file. Files record it: it never changes with modules.
FORMAT = "m3.quantize"
FORMAT_VERSION = 1


class BytesRoundTrip:
    """`to_bytes`/`from_bytes` for a class that has `save(file)` and `load(file, device=)`.

    A store keeps its quantizer's bytes inside its own file this way.
    """

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


class VectorQuantizer(BytesRoundTrip, ABC):
    """Compresses `d`-dim float vectors to fixed-size byte codes, and back.

    Subclasses define their settings in the constructor (plain keyword arguments: recipes
    build them by name), `code_bytes`, and the hooks `_fit`, `_encode`, `_decode`,
    `_state`, `_load_state`; this class checks inputs, moves tensors between devices and
    saves and loads.

    Args:
        dim: Dimension `d` of the vectors.
    """

    def __init__(self, dim: int) -> None:
        self.dim = check_int(type(self).__name__, "dim", dim, low=1)
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

    def describe(self, *, legacy: bool = False) -> dict[str, Any]:
        """The quantizer's class and settings, JSON-serialisable (e.g. for `StoreInfo`).

        Args:
            legacy: Name the class as m3 0.1 did (its module path), to recompute the
                fingerprints that m3 0.1 recorded.

        Returns:
            `{"class_path", "init_args", "code_bytes"}`, the class by its identity (e.g.
            `quantizer:composite`); `from_description` rebuilds an untrained quantizer.
        """
        name = registry.legacy_class_path if legacy else registry.identity
        return {
            "class_path": name(type(self)),
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
            UserError: When the class cannot be found or is not a `VectorQuantizer`. A class
                path that m3 0.1 wrote (e.g. `m3.quantize.CompositeQuantizer`) is found.
        """
        path = str(description.get("class_path", ""))
        try:
            # also m3 0.1's module paths (`m3.quantize.…`), read where the classes are now
            cls = registry.class_of(path)
        except UserError as error:
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
        data = load_file(path, FORMAT)
        return cls._from_payload(data, device)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


def load_file(path: str | Path | BinaryIO, fmt: str) -> dict[str, Any]:
    """Read a file that a quantizer's `save` wrote, checking its format and version.

    Args:
        path: File path or binary file object.
        fmt: The format it must have: `FORMAT`, or `f"{FORMAT}.MemoryQuantizer"`.

    Returns:
        The file's contents (a dict of plain values and tensors, on the CPU).

    Raises:
        UserError: For a missing or unreadable file, another format, or another version.
    """
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
