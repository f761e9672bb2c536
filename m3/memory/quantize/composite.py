"""The paper's codec: an OPQ rotation, coarse codes and residual PQ, 14 bytes per 80-dim vector.

`CompositeQuantizer` builds what FAISS builds for `OPQ20_80,Residual2x14,PQ8x10` (paper
§3.3); `train_rotation` is OPQ's non-parametric rotation (Ge et al., 2013).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from m3.core.checks import check_choice, check_int
from m3.core.errors import UserError
from m3.memory.quantize.base import VectorQuantizer
from m3.memory.quantize.bits import MAX_BITS, pack_codes, packed_bytes, unpack_codes
from m3.memory.quantize.kmeans import kmeans, nearest, subsample
from m3.memory.quantize.product import pq_assign, pq_decode, pq_train, split_subspaces


def train_rotation(
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
            split_subspaces(rotated, subspaces).contiguous(),
            1 << bits,
            iterations=first_pq_iterations if codebooks is None else pq_iterations,
            generator=generator,
            init=codebooks,
        )
        approx = pq_decode(pq_assign(rotated, codebooks), codebooks)
        left, _, right = torch.linalg.svd(vectors.double().T @ approx.double())
        rotation = left @ right
    return rotation.float()


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
            check_int(owner, "opq_subspaces", opq_subspaces, low=1)
            if dim % opq_subspaces:
                raise UserError(
                    f"{owner}: dim {dim} is not divisible by opq_subspaces={opq_subspaces}"
                )
        self.opq_subspaces = opq_subspaces
        self.opq_bits = check_int(owner, "opq_bits", opq_bits, low=1, high=MAX_BITS)
        self.opq_iterations = check_int(owner, "opq_iterations", opq_iterations, low=1)
        self.coarse = check_choice(owner, "coarse", coarse, {"multi_index": None, "residual": None})
        self.coarse_codes = check_int(owner, "coarse_codes", coarse_codes, low=0)
        if coarse == "multi_index" and coarse_codes and dim % coarse_codes:
            raise UserError(
                f"{owner}: dim {dim} is not divisible by coarse_codes={coarse_codes} "
                "(the multi-index splits vectors into that many parts)"
            )
        self.coarse_bits = check_int(owner, "coarse_bits", coarse_bits, low=1, high=MAX_BITS)
        self.pq_subspaces = check_int(owner, "pq_subspaces", pq_subspaces, low=1)
        if dim % pq_subspaces:
            raise UserError(f"{owner}: dim {dim} is not divisible by pq_subspaces={pq_subspaces}")
        self.pq_bits = check_int(owner, "pq_bits", pq_bits, low=1, high=MAX_BITS)
        self.iterations = check_int(owner, "iterations", iterations, low=0)
        self.points_per_centroid = check_int(
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

    def describe(self, *, legacy: bool = False) -> dict[str, Any]:
        """See `VectorQuantizer.describe`; adds the FAISS `factory` string where one exists.

        Args:
            legacy: Name the class as m3 0.1 did.

        Returns:
            The description.
        """
        description = super().describe(legacy=legacy)
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
            rotation = train_rotation(
                subsample(vectors, (1 << self.opq_bits) * self.points_per_centroid, generator),
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
            coarse = pq_train(
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
                sample = subsample(residual, size * self.points_per_centroid, generator)
                centroids = kmeans(sample, size, iterations=self.iterations, generator=generator)
                index, _ = nearest(residual[None], centroids[None])
                residual = residual - centroids[index[0]]
                levels.append(centroids)
            coarse = torch.stack(levels)
        self.rotation, self.coarse_codebooks = rotation, coarse
        residual = rotated - self._coarse_decode(self._coarse_assign(rotated))
        self.codebooks = pq_train(
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
            return pq_assign(rotated, coarse)
        levels, residual = [], rotated
        for centroids in coarse:
            index, _ = nearest(residual[None], centroids[None])
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
            return pq_decode(index, coarse)
        levels = torch.arange(self.coarse_codes, device=coarse.device)
        return coarse[levels[None, :], index].sum(dim=1)

    def _encode(self, vectors: Tensor) -> Tensor:
        assert self.rotation is not None and self.codebooks is not None
        rotated = vectors.float() @ self.rotation
        index = self._coarse_assign(rotated)
        residual = rotated - self._coarse_decode(index)
        fine = pack_codes(pq_assign(residual, self.codebooks), self.pq_bits)
        if not self.coarse_codes:
            return fine
        return torch.cat([pack_codes(index, self.coarse_bits), fine], dim=1)

    def _decode(self, codes: Tensor) -> Tensor:
        assert self.rotation is not None and self.codebooks is not None
        split = self.coarse_bytes
        fine = unpack_codes(codes[:, split:].contiguous(), self.pq_bits, self.pq_subspaces)
        rotated = pq_decode(fine, self.codebooks)
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
