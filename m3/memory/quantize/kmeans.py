"""Lloyd's k-means in torch, on the device of the training vectors, and nearest-centroid search.

Several independent problems of equal size are solved together when the vectors have a
leading group dimension (the subspaces of a product quantizer). Distances are computed in
blocks of `2^20` elements, which bounds memory whatever the number of vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from m3.core.checks import check_int
from m3.core.errors import UserError

#: elements of one block of the distance matrix (4 MiB in float32): bounds k-means' memory
_BLOCK_ELEMENTS = 1 << 20


def nearest(vectors: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
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


def subsample(vectors: Tensor, limit: int, generator: torch.Generator, *, dim: int = 0) -> Tensor:
    """At most `limit` of the vectors along `dim`, drawn without replacement.

    Args:
        vectors: The vectors.
        limit: How many to keep at most.
        generator: CPU generator of the draw.
        dim: The dimension that indexes the vectors.

    Returns:
        `vectors` itself when there are at most `limit`, else `limit` of them in random
        order.
    """
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
    k = check_int("kmeans", "k", k, low=1)
    iterations = check_int("kmeans", "iterations", iterations, low=0)
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
        index, distance = nearest(data, centroids)
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
