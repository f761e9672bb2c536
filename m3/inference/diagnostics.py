"""Diagnostics for a model that ignores its memories.

Two questions come first when explicit memory does not help:

1. *Does the model look at its memories?* `memory_attention` runs a forward pass and returns,
   for every memory layer and query head, the share of each token's attention that went to
   memory tokens (the rest went to the context). A model that never learned to read its
   memories puts almost nothing there.
2. *What did the memories keep?* `kept_tokens` shows, per memory layer and key/value head,
   which tokens of a reference the sparsifier kept (paper §3.3: the top-k by attention received),
   as text: if the facts a question needs are never kept, no amount of training reads them.

```python
from m3.inference.diagnostics import kept_tokens, memory_attention

shares = memory_attention(model, idx, memories, prefix=prefix)   # (L_mem, B, H, T)
shares.mean(dim=(1, 3))                                          # per layer and head
kept_tokens(memory[0], reference_ids, tokenizer)                 # [[tokens of layer 0 head 0], ...]
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from m3.core.memories import Memories, SparseMemory
    from m3.data.tokenizer import Tokenizer
    from m3.model.memory3 import Memory3


@torch.no_grad()
def memory_attention(model: Memory3, idx: Tensor, memories: Memories, *, prefix: Tensor) -> Tensor:
    """The share of attention each token puts on its memory tokens, per memory layer and head.

    In memory mode a token's attention is one softmax over its memory tokens and its context
    (paper §3.1–§3.2); the share is the softmax mass of the memory part,
    `Z_mem / (Z_mem + Z_ctx) = exp(lse_memory − lse_all)`.

    It is measured by one ordinary forward pass, with no second implementation: the one-pass
    memory attention already computes it, in the anchor key's extra value channel
    (`m3.model.attention.anchored_causal_attention`), and each memory layer's `Attention`
    keeps it while its `memory_shares` is a list. This function sets those lists, runs the
    pass and clears them again.

    Args:
        model: The model.
        idx: `(B, T)` token ids; token 0 is the context's `<s>`.
        memories: The memories the chunks read (as in `Memory3.forward`).
        prefix: `(b,)` ids of the reference prefix.

    Returns:
        `(L_mem, B, H, T)` shares in [0, 1], one row per memory layer in
        `model.config.memory_layers` order; 0 where a token has no valid memory.
    """
    layers = [model.layers[i].self_attn for i in model.config.memory_layers or ()]
    for attention in layers:
        attention.memory_shares = []
    try:
        model(idx, memories, prefix=prefix)
        # a layer records nothing when no chunk sees any memory: all its shares are 0
        none = torch.zeros(idx.shape[0], model.config.n_head, idx.shape[1], device=idx.device)
        return torch.stack(
            [a.memory_shares[0].float() if a.memory_shares else none for a in layers]
        )
    finally:
        for attention in layers:
            attention.memory_shares = None


def kept_tokens(
    memory: SparseMemory, reference_ids: Sequence[int], tokenizer: Tokenizer
) -> list[list[list[str]]]:
    """The tokens one reference's memory kept, as text, per memory layer and key/value head.

    Args:
        memory: One reference's sparse memory (`memory[i]` of a `SparseMemory`), positions
            `(1, L_mem, H_kv, k)` or `(L_mem, H_kv, k)`.
        reference_ids: The reference's token ids (without the reference prefix), as stored.
        tokenizer: Decodes each kept token.

    Returns:
        `[layer][head]` lists of the kept tokens' text, in position order; empty slots (a
        reference shorter than `k`) left out.
    """
    positions = memory.positions
    if positions.dim() == 4:
        positions = positions[0]
    ids = list(reference_ids)
    return [
        [[tokenizer.decode([ids[p]]) for p in head.tolist() if 0 <= p < len(ids)] for head in layer]
        for layer in positions
    ]
