"""Product quantization (PQ): vectors cut into subspaces, each coded by its own k-means.

The helpers on `(n, d)` vectors and `(M, K, d / M)` codebooks (`split_subspaces`, `pq_assign`,
`pq_decode`, `pq_train`) are shared with `m3.memory.quantize.composite`, whose coarse
multi-index and residual codes are product codes too; `ProductQuantizer` is the quantizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from m3.core.checks import check_int
from m3.core.errors import UserError
from m3.memory.quantize.base import VectorQuantizer
from m3.memory.quantize.bits import MAX_BITS, pack_codes, packed_bytes, unpack_codes
from m3.memory.quantize.kmeans import kmeans, nearest, subsample


def split_subspaces(vectors: Tensor, count: int) -> Tensor:
    """Cut vectors into `M` subspaces of consecutive dimensions.

    Args:
        vectors: `(n, d)` vectors, `d` divisible by `count`.
        count: Number of subspaces `M`.

    Returns:
        `(M, n, d / M)`: a view, subspace first.
    """
    return vectors.reshape(vectors.shape[0], count, vectors.shape[1] // count).transpose(0, 1)


def pq_assign(vectors: Tensor, codebooks: Tensor) -> Tensor:
    """The product code of vectors: the nearest centroid in every subspace.

    Args:
        vectors: `(n, d)` float vectors.
        codebooks: `(M, K, d / M)` centroids of the `M` subspaces.

    Returns:
        `(n, M)` long centroid indices.
    """
    index, _ = nearest(split_subspaces(vectors, codebooks.shape[0]).contiguous(), codebooks)
    return index.T


def pq_decode(index: Tensor, codebooks: Tensor) -> Tensor:
    """Vectors from their product codes: each subspace's centroid, side by side.

    Args:
        index: `(n, M)` long centroid indices.
        codebooks: `(M, K, d / M)` centroids of the `M` subspaces.

    Returns:
        `(n, d)` vectors.
    """
    spaces, size, width = codebooks.shape
    # one index_select over the stacked codebooks: several times faster than a 2-D gather
    offsets = torch.arange(spaces, device=codebooks.device) * size
    rows = (index + offsets).flatten()
    return codebooks.reshape(spaces * size, width).index_select(0, rows).view(-1, spaces * width)


def pq_train(
    vectors: Tensor,
    subspaces: int,
    size: int,
    *,
    iterations: int,
    generator: torch.Generator,
    points_per_centroid: int,
    init: Tensor | None = None,
) -> Tensor:
    """Codebooks of a product quantizer, trained by k-means on a sample of `vectors`.

    Args:
        vectors: `(n, d)` float training vectors.
        subspaces: Number of subspaces `M` (dividing `d`).
        size: Centroids per subspace `K`.
        iterations: k-means iterations.
        generator: CPU generator of the sample and of k-means' initial draw.
        points_per_centroid: Training vectors drawn per centroid at most.
        init: `(M, K, d / M)` starting codebooks instead of a draw (warm start).

    Returns:
        `(M, K, d / M)` float32 codebooks.
    """
    sample = subsample(vectors, size * points_per_centroid, generator)
    parts = split_subspaces(sample, subspaces).contiguous()
    return kmeans(parts, size, iterations=iterations, generator=generator, init=init)


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
        self.subspaces = check_int(owner, "subspaces", subspaces, low=1)
        if dim % subspaces:
            raise UserError(f"{owner}: dim {dim} is not divisible by subspaces={subspaces}")
        self.bits = check_int(owner, "bits", bits, low=1, high=MAX_BITS)
        self.iterations = check_int(owner, "iterations", iterations, low=0)
        self.points_per_centroid = check_int(
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
        self.codebooks = pq_train(
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
        return pq_assign(vectors.to(self.device).float(), self.codebooks).to(vectors.device)

    def _encode(self, vectors: Tensor) -> Tensor:
        assert self.codebooks is not None
        return pack_codes(pq_assign(vectors.float(), self.codebooks), self.bits)

    def _decode(self, codes: Tensor) -> Tensor:
        assert self.codebooks is not None
        return pq_decode(unpack_codes(codes, self.bits, self.subspaces), self.codebooks)

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
