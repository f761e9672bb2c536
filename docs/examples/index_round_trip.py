"""A search index filled, searched, updated, saved and loaded back (`m3.backends.MemoryIndex`).

Random vectors stand in for reference embeddings: `python docs/examples/index_round_trip.py
OUT_DIR` (a `ScannIndex`; `ExactIndex` has the same methods).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from m3.backends import MemoryIndex, ScannIndex


def index_round_trip(directory: str, kind: type[MemoryIndex] = ScannIndex) -> MemoryIndex:
    """Index 1,000 random 384-dim vectors, search with noisy copies of a few of them."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1000, 384, generator=generator)
    ids = torch.arange(1000) * 10  # any int64 ids ≥ 0: those of the references
    queries = embeddings[:3] + 0.1 * torch.randn(3, 384, generator=generator)
    stale_ids = ids[:1]

    index = kind(384, metric="cosine")  # ScannIndex(384, metric="cosine") or ExactIndex(…)
    index.add(embeddings, ids)  # (N, 384) floats, (N,) int64 ids ≥ 0
    index.build()  # ExactIndex: nothing to do
    scores, found = index.search(queries, k=5)  # (Q, 5) float32 best first, (Q, 5) int64
    print(found[:, 0].tolist(), scores[:, 0].tolist())  # each query finds its own vector
    index.remove(stale_ids)  # re-adding an id replaces its vector
    index.save(Path(directory) / "index")
    index = kind.load(Path(directory) / "index")
    print(len(index), "vectors;", index.search(queries, k=1).ids[:, 0].tolist())
    return index


if __name__ == "__main__":
    index_round_trip(sys.argv[1])
