"""A sparsifier that ignores the selection scores: a baseline for ablations.

Shown in the guide "Writing your own component" (docs/guides/writing-a-component.md) and
built from a recipe by `tests/test_docs_examples.py`.
"""

from __future__ import annotations

import torch

from m3.memory.encoder import DenseMemory
from m3.memory.sparsifier import Sparsifier


class FirstTokensSparsifier(Sparsifier):
    """Keep the first `k` tokens of every reference, whatever attention they receive.

    Comparing a model trained with it against `TopKSparsifier` measures what the paper's
    attention-based choice of tokens is worth.

    Args:
        k: Tokens kept per memory layer and key/value head.
    """

    def select(self, dense: DenseMemory) -> torch.Tensor:
        """Positions `0 … k−1` for every reference, memory layer and head.

        Args:
            dense: Dense memories; `dense.scores` is `(N, L_mem, H_kv, T)`.

        Returns:
            `(N, L_mem, H_kv, k)` long positions; those at or beyond a reference's length
            mark empty slots, which `Sparsifier.forward` turns invalid.
        """
        count, layers, heads, _ = dense.scores.shape
        first = torch.arange(self.k, device=dense.scores.device)
        return first.expand(count, layers, heads, self.k)
