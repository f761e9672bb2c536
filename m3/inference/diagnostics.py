"""Diagnostics for a model that ignores its memories.

Two questions come first when explicit memory does not help:

1. *Does the model look at its memories?* `memory_attention` runs a forward pass and returns,
   for every memory layer and query head, the share of each token's attention that went to
   memory tokens (the rest went to the context). A model that never learned to read its
   memories puts almost nothing there.
2. *What did the memories keep?* `kept_tokens` shows, per memory layer and key/value head,
   which tokens of a reference the sparsifier kept (paper §3.3: the top-k by attention received),
   as text: if the facts a question needs are never kept, no amount of training reads them;
   `answer_token_share` counts it for cloze questions: the share of each answer's tokens
   among the kept tokens of the reference that states it, per layer and head.

```python
from m3.inference.diagnostics import kept_tokens, memory_attention

shares = memory_attention(model, idx, memories, prefix=prefix)   # (L_mem, B, H, T)
shares.mean(dim=(1, 3))                                          # per layer and head
kept_tokens(memory[0], reference_ids, tokenizer)                 # [[tokens of layer 0 head 0], ...]
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from m3.backends.base import MemoryStore
    from m3.core.memories import Memories, SparseMemory
    from m3.data.tokenizer import Tokenizer
    from m3.data.world import ClozeQuestion
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


def answer_references(store: MemoryStore, questions: Sequence[ClozeQuestion]) -> list[set[int]]:
    """Per question, the ids of the references cut from the documents that state its answer.

    Args:
        store: The bank's store (its references keep their document ids).
        questions: Cloze questions; `kb_ids` names the knowledge-base documents.

    Returns:
        Per question, reference ids (empty where the bank holds none of its documents).
    """
    ids = store.ids().tolist()
    by_document: dict[str, set[int]] = {}
    for i, reference in zip(ids, store.references(ids), strict=True):
        by_document.setdefault(str(reference.doc_id), set()).add(i)
    return [set().union(*(by_document.get(d, set()) for d in q.kb_ids)) for q in questions]


@dataclass(frozen=True)
class AnswerTokenShare:
    """Which share of an answer's tokens the sparsifier kept in the answer's memory.

    Attributes:
        share: `(L_mem, H_kv)` mean, over the questions located, of the share of the answer's
            tokens among the tokens that memory layer and key/value head kept.
        any_head: `(L_mem,)` the same share for the tokens kept by at least one head.
        questions: Questions whose answer was found in a reference (the mean's count).
        missing: Questions whose answer's token ids are in none of their references.
    """

    share: Tensor
    any_head: Tensor
    questions: int
    missing: int

    def as_plain(self) -> dict[str, Any]:
        """JSON-ready values (tensors as nested lists)."""
        return {
            "share": self.share.tolist(),
            "any_head": self.any_head.tolist(),
            "mean": float(self.share.mean()) if self.questions else None,
            "questions": self.questions,
            "missing": self.missing,
        }


def _locate(
    refs: set[int], tokens: dict[int, tuple[int, ...]], spellings: list[list[int]]
) -> tuple[int, int, int] | None:
    """`(reference, first answer token, answer length)` of the first spelling found."""
    for answer in (a for a in spellings if a):
        for r in sorted(refs):
            ids = tokens[r]
            for start in range(len(ids) - len(answer) + 1):
                if list(ids[start : start + len(answer)]) == answer:
                    return r, start, len(answer)
    return None


def answer_token_share(
    store: MemoryStore, tokenizer: Tokenizer, questions: Sequence[ClozeQuestion]
) -> AnswerTokenShare:
    """The share of each answer's tokens present among the kept tokens of its memory.

    For every question, the reference of its `kb_ids` documents whose token ids hold the
    answer's (`tokenizer.encode(answer_text)`, else without its leading space); then, per
    memory layer and key/value head, which share of those tokens the stored memory kept
    (its `positions`). A fact the sparsifier drops cannot be read back from memory, however
    well the model reads.

    Args:
        store: The bank's store.
        tokenizer: The tokenizer the bank was written with.
        questions: Cloze questions (`answer_text`, `kb_ids`).

    Returns:
        The shares, averaged over the questions whose answer was located.
    """
    holders = answer_references(store, questions)
    located: list[tuple[int, int, int]] = []  # (reference, first answer token, answer length)
    missing = 0
    candidates = sorted(set().union(*holders))
    tokens = dict(zip(candidates, (r.ids for r in store.references(candidates)), strict=True))
    for question, refs in zip(questions, holders, strict=True):
        answer = question.answer_text
        hit = _locate(refs, tokens, [tokenizer.encode(answer), tokenizer.encode(answer.strip())])
        if hit is None:
            missing += 1
        else:
            located.append(hit)
    if not located:
        shape = store.info.memory_shape
        zeros = torch.zeros(shape[0], shape[2])
        return AnswerTokenShare(zeros, zeros[:, 0], 0, missing)
    unique = sorted({r for r, _, _ in located})
    positions = store.read(unique).positions  # (N, L_mem, H_kv, k)
    row = {r: n for n, r in enumerate(unique)}
    shares, any_head = [], []
    for reference, start, length in located:
        kept = positions[row[reference]]
        inside = (kept >= start) & (kept < start + length)  # (L_mem, H_kv, k), unique slots
        shares.append(inside.sum(-1).float() / length)
        span = torch.arange(start, start + length)
        per_layer = (kept.flatten(1)[:, :, None] == span).any(1)  # (L_mem, length)
        any_head.append(per_layer.float().mean(-1))
    return AnswerTokenShare(
        torch.stack(shares).mean(0), torch.stack(any_head).mean(0), len(located), missing
    )
