"""The write path's first half: references -> dense per-layer keys, values and selection scores.

Each reference is encoded on its own by the model itself, with its BOS replaced by the
prefix `<s>Reference:`, through the memory layers only (paper §3.3). For every memory layer and
key/value head the encoder returns the post-RoPE keys and the values of the reference's
tokens, and a *selection score* per token: the attention it receives within the reference,

    w_j = Σ_i exp(q_i · k_j / √d_h)

with queries and keys taken before RoPE and without causal mask, the prefix and padding
taking no part (neither as i nor as j), computed in log space so that bf16 cannot overflow.
With grouped-query attention the scores of the query heads that share a key/value head are
combined (summed by default). A `m3.memory.sparsifier.Sparsifier` then keeps the top-k tokens.

```python
encoder = MemoryEncoder()
dense = encoder(model, tokens, lengths, prefix=tokenizer_prefix_ids)
memory = TopKSparsifier(k=8)(dense)            # SparseMemory, ready for a store
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.model.memory3 import Memory3


@dataclass
class DenseMemory:
    """Every token's keys, values and selection score for `N` references.

    Attributes:
        keys: Post-RoPE keys, `(N, L_mem, H_kv, T, d_h)`; token `j` of a reference sits at
            position `b + j` (`b` = prefix length), as memory mode expects.
        values: Values, `(N, L_mem, H_kv, T, d_h)`.
        scores: Log selection scores, `(N, L_mem, H_kv, T)`, −inf at padding.
        lengths: Tokens per reference, `(N,)` long (without the prefix).
    """

    keys: Tensor
    values: Tensor
    scores: Tensor
    lengths: Tensor


class MemoryEncoder(nn.Module):
    """Encode references into dense memories with the model's own memory layers.

    The encoder has no weights: it runs whatever model it is given (in training, the current
    weights, with gradients; at bank-building time, frozen weights). Subclass it and override
    `selection_scores` to rank tokens differently.

    Args:
        score: "exp" ranks token `j` by `log Σ_i exp(s_ij)` (the paper's formula); "softmax"
            by `log Σ_i softmax_j(s_ij)` (the sum of normalised attention weights, the
            alternative the paper allows).
        head_reduction: How the query heads sharing a key/value head combine their scores:
            "sum" (default), "mean" or "max".
        exclude_prefix: Leave the `<s>Reference:` prefix out of the scores, as query and as
            key (default). When False only the BOS is left out.
    """

    def __init__(
        self,
        *,
        score: Literal["exp", "softmax"] = "exp",
        head_reduction: Literal["sum", "mean", "max"] = "sum",
        exclude_prefix: bool = True,
    ) -> None:
        super().__init__()
        if score not in ("exp", "softmax"):
            raise UserError(f"score must be 'exp' or 'softmax', got {score!r}")
        if head_reduction not in ("sum", "mean", "max"):
            raise UserError(
                f"head_reduction must be 'sum', 'mean' or 'max', got {head_reduction!r}"
            )
        self.score = score
        self.head_reduction = head_reduction
        self.exclude_prefix = exclude_prefix

    def forward(
        self, model: Memory3, tokens: Tensor, lengths: Tensor, *, prefix: Tensor
    ) -> DenseMemory:
        """Encode a batch of references.

        Args:
            model: The model whose memory layers encode.
            tokens: `(N, T)` reference token ids, right-padded (no prefix, no BOS).
            lengths: `(N,)` tokens per reference, 1..T.
            prefix: `(b,)` ids of the `<s>Reference:` prefix.

        Returns:
            The dense memories.
        """
        count, length = tokens.shape
        limit = model.config.reference_length
        if length > limit or bool((lengths > limit).any()):
            raise UserError(
                f"references must have at most {limit} tokens, got {int(lengths.max())}"
            )
        if bool((lengths < 1).any()):
            raise UserError("empty reference: every reference needs at least one token")
        width = prefix.numel()
        if width < 1:
            raise UserError("the reference prefix must hold at least the BOS id")
        prefix = prefix.to(device=tokens.device, dtype=torch.long)
        idx = torch.cat([prefix.expand(count, width), tokens], dim=1)
        states = model.reference_states(idx)
        real = torch.arange(length, device=tokens.device) < lengths[:, None].to(tokens.device)
        # which rows take part in the scores: the reference's tokens, plus the prefix after
        # its BOS when the prefix is not excluded
        scored = torch.cat(
            [torch.zeros(count, width, dtype=torch.bool, device=real.device), real], 1
        )
        if not self.exclude_prefix:
            scored[:, 1:width] = True
        keys, values, scores = [], [], []
        for state in states:
            keys.append(state.rotated_keys[:, :, width:])
            values.append(state.values[:, :, width:])
            with torch.no_grad():  # scores only choose indices, which carry no gradient
                layer_scores = self.selection_scores(state.queries, state.keys, scored)
            scores.append(layer_scores[..., width:])
        return DenseMemory(
            keys=torch.stack(keys, dim=1),
            values=torch.stack(values, dim=1),
            scores=torch.stack(scores, dim=1),
            lengths=lengths.to(tokens.device),
        )

    def selection_scores(self, queries: Tensor, keys: Tensor, scored: Tensor) -> Tensor:
        """Log attention each token receives within its reference (paper §3.3).

        Args:
            queries: `(N, H, S, d_h)` queries before RoPE.
            keys: `(N, H_kv, S, d_h)` keys before RoPE.
            scored: `(N, S)` bool: tokens that take part, as query and as key.

        Returns:
            `(N, H_kv, S)` log scores in fp32, −inf for tokens that take no part.
        """
        count, heads, length, dim = queries.shape
        kv_heads = keys.shape[1]
        groups = heads // kv_heads
        # the query heads of a group are consecutive: (N, H_kv, G·S, d), index g·S + i
        q = queries.float().reshape(count, kv_heads, groups * length, dim)
        # keys on the rows, so that every reduction below runs over the contiguous last axis
        logits = keys.float() @ q.transpose(-1, -2) / math.sqrt(dim)  # (N, H_kv, S_j, G·S_i)
        if self.score == "softmax":
            # normalise each query's attention over the keys that take part
            logits = logits.masked_fill(~scored[:, None, :, None], float("-inf"))
            row = torch.logsumexp(logits, dim=-2, keepdim=True)
            logits = logits - row.masked_fill(torch.isinf(row), 0.0)
        logits = logits.masked_fill(~scored.repeat(1, groups)[:, None, None, :], float("-inf"))
        if self.head_reduction == "max":
            per_head = torch.logsumexp(logits.view(count, kv_heads, length, groups, length), -1)
            combined = per_head.max(dim=-1).values
        else:
            combined = torch.logsumexp(logits, dim=-1)
            if self.head_reduction == "mean":
                combined = combined - math.log(groups)
        return combined.masked_fill(~scored[:, None, :], float("-inf"))


def encode_references(
    model: Memory3,
    references: Sequence[Sequence[int]],
    *,
    prefix: Sequence[int] | Tensor,
    encoder: MemoryEncoder | None = None,
    sparsifier: nn.Module | None = None,
    batch_size: int = 64,
) -> SparseMemory:
    """Encode and sparsify many references in length-sorted batches (less padding).

    Args:
        model: The model whose memory layers encode.
        references: Token ids of each reference (≤ `reference_length` tokens, no prefix).
        prefix: Ids of the `<s>Reference:` prefix.
        encoder: The encoder; `MemoryEncoder()` when None.
        sparsifier: The sparsifier; `TopKSparsifier(k=model.config.memory_tokens)` when None.
        batch_size: References per forward pass.

    Returns:
        The sparse memories of all references, in the order given.
    """
    from m3.memory.sparsifier import TopKSparsifier

    if not references:
        raise UserError("no references to encode")
    encoder = encoder or MemoryEncoder()
    sparsifier = sparsifier or TopKSparsifier(k=model.config.memory_tokens)
    device = model.lm_head.weight.device
    prefix = torch.as_tensor(prefix, dtype=torch.long, device=device)
    order = sorted(range(len(references)), key=lambda i: len(references[i]))
    parts: list[SparseMemory] = []
    for start in range(0, len(order), batch_size):
        batch = [references[i] for i in order[start : start + batch_size]]
        lengths = torch.tensor([len(r) for r in batch], device=device)
        tokens = torch.zeros(
            len(batch), max(len(r) for r in batch), dtype=torch.long, device=device
        )
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        parts.append(sparsifier(encoder(model, tokens, lengths, prefix=prefix)))
    memory = SparseMemory.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return memory[inverse.to(memory.keys.device)]
