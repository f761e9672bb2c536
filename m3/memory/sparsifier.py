"""The write path's second half: dense memories -> the top-k tokens per layer and head.

The paper keeps, per memory layer and key/value head, the 8 of a reference's ≤ 128 tokens
that receive the most attention within the reference (paper §3.3): 16× fewer tokens, the
largest of the four sparsification axes (layers, heads, tokens, vector quantization).

The kept tokens' positions are kept too, so every stored memory can be shown back as the
reference text it came from. Indices are chosen without gradient; the gathered keys and
values keep theirs, so continual training can learn through the selected memories (paper §3.5, §5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.memory.encoder import DenseMemory


class Sparsifier(nn.Module, ABC):
    """Turns dense per-token memories into sparse memories of `k` tokens per layer and head.

    Subclass it and implement `select` to choose tokens another way; the gathering, the
    validity mask and the position bookkeeping are shared.

    Args:
        k: Tokens kept per memory layer and key/value head.
    """

    def __init__(self, k: int = 8) -> None:
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"k must be a positive integer, got {k!r}")
        self.k = k

    @abstractmethod
    def select(self, dense: DenseMemory) -> torch.Tensor:
        """Choose the tokens to keep.

        Args:
            dense: The dense memories; `dense.scores` is `(N, L_mem, H_kv, T)` with `T ≥ k`.

        Returns:
            `(N, L_mem, H_kv, k)` long token positions; positions at or beyond a reference's
            length mark slots left empty (references shorter than `k`).
        """

    def forward(self, dense: DenseMemory) -> SparseMemory:
        """Keep `k` tokens per memory layer and key/value head.

        Args:
            dense: Keys/values `(N, L_mem, H_kv, T, d_h)`, scores `(N, L_mem, H_kv, T)`.

        Returns:
            The sparse memory: keys/values `(N, L_mem, H_kv, k, d_h)`, kept tokens in
            ascending position order, real tokens first.
        """
        length = dense.scores.shape[-1]
        if length < self.k:  # every reference is shorter than k: pad so that k slots exist
            pad = self.k - length
            dense = DenseMemory(
                keys=nn.functional.pad(dense.keys, (0, 0, 0, pad)),
                values=nn.functional.pad(dense.values, (0, 0, 0, pad)),
                scores=nn.functional.pad(dense.scores, (0, pad), value=float("-inf")),
                lengths=dense.lengths,
            )
        with torch.no_grad():
            chosen = self.select(dense).sort(dim=-1).values
        # a slot is valid when it holds a real token in every layer and head (the model's
        # validity mask is per reference and slot); with top-k these are the first min(n, k)
        valid = (chosen < dense.lengths[:, None, None, None]).flatten(1, 2).all(dim=1)
        gather = chosen.clamp(max=dense.keys.shape[3] - 1)[..., None].expand(
            *chosen.shape, dense.keys.shape[-1]
        )
        return SparseMemory(
            keys=torch.gather(dense.keys, 3, gather),
            values=torch.gather(dense.values, 3, gather),
            valid=valid,
            positions=chosen.masked_fill(~valid[:, None, None, :], -1),
        )


class TopKSparsifier(Sparsifier):
    """Keep the `k` tokens with the highest selection scores (the paper's choice).

    Ties are broken towards the earlier token, so the choice is deterministic.

    Args:
        k: Tokens kept per memory layer and key/value head (the paper: 8).
    """

    def select(self, dense: DenseMemory) -> torch.Tensor:
        """The `k` best-scored positions (see `Sparsifier.select`)."""
        # a stable descending sort keeps equal scores in position order
        order = torch.sort(dense.scores, dim=-1, descending=True, stable=True).indices
        return order[..., : self.k]
