"""Scoring token rows: log-probabilities of chosen tokens, with memories, without, or in warmup.

The shared core of `m3.inference.evaluate` (`m3 evaluate`) and `m3.inference.harness` (m3 as
an lm-evaluation-harness model): right-padded rows of token ids, each starting with `<s>`,
are read in one forward pass and their tokens from a given position on are scored.

- `scored_tokens` reads the rows in memory mode (the reference prefix in front, the memories
  each chunk sees) or in warmup mode (a plain causal LM: no prefix, no memories);
- `heldout_memories` retrieves the memories of held-out windows under the paper's protocol
  (each 64-token chunk retrieves with its own text) or the causal one (chunk `c` reads what
  chunk `c − 1` retrieved);
- `scored_continuations` scores several continuations of each context (a cloze question's
  options) reading the context once: one prefill, then each continuation decoded from a copy
  of the cache; the same scores as `scored_tokens` on the full rows;
- `reference_prefix_ids` is the small piece all of them need.

```python
token_logp, hits, mask = scored_tokens(model, rows, scored_from, memories, prefix)
scores = (token_logp * mask).sum(-1)          # (R,) summed log-probability per row
```
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from m3.core.checks import right_pad
from m3.core.memories import Memories

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.model.memory3 import Memory3
    from m3.retrieval.retriever import Retriever

__all__ = ["heldout_memories", "reference_prefix_ids", "scored_continuations", "scored_tokens"]


def reference_prefix_ids(tokenizer: Tokenizer, device: torch.device) -> Tensor:
    """The reference prefix `<s>Reference:` as a tensor.

    Args:
        tokenizer: The model's tokenizer.
        device: Where the tensor goes.

    Returns:
        `(b,)` long ids.
    """
    return torch.tensor(tokenizer.reference_prefix(), dtype=torch.long, device=device)


@torch.no_grad()
def scored_tokens(
    model: Memory3,
    rows: list[list[int]],
    scored_from: list[int],
    memories: Memories | None,
    prefix: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Read right-padded rows and score their tokens from `scored_from` on.

    Args:
        model: The model.
        rows: `R` token-id rows, each starting with `<s>`.
        scored_from: Per row, the position of its first scored token (≥ 1).
        memories: The rows' memories (every chunk sees what chunk 0 sees when the pool has
            one chunk); None reads none.
        prefix: The reference prefix ids (memory mode), or None to read the rows in warmup
            mode (no prefix, no memories).

    Returns:
        `(R, T − 1)` log-probabilities of each next token, whether it was the argmax, and
        the mask of scored positions.
    """
    device = next(model.parameters()).device
    idx, lengths = right_pad(rows, 0)
    idx, lengths = idx.to(device), lengths.to(device)
    chunks = math.ceil(idx.shape[1] / model.config.chunk_length)
    if prefix is None:
        assert memories is None, "warmup mode reads no memories"
        logits = model(idx).float()[:, :-1]
    else:
        if memories is None:
            memories = Memories.empty(len(rows), chunks, memory_shape=model.config.memory_shape)
        elif memories.num_chunks == 1 and chunks > 1:
            visible = memories.visible.expand(-1, chunks, -1)
            memories = Memories(memories.keys, memories.values, memories.valid, visible)
        memories = memories.to(device=device, dtype=next(model.parameters()).dtype)
        logits = model(idx, memories, prefix=prefix).float()[:, :-1]
    targets = idx[:, 1:, None]
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets)[..., 0]
    hits = (logits.argmax(-1, keepdim=True) == targets)[..., 0].float()
    position = torch.arange(idx.shape[1] - 1, device=device)[None]
    start = torch.tensor(scored_from, device=device)[:, None]
    mask = (position >= start - 1) & (position < lengths[:, None] - 1)
    return token_logp, hits, mask


@torch.no_grad()
def scored_continuations(
    model: Memory3,
    contexts: list[list[int]],
    continuations: list[list[list[int]]],
    memories: Memories | None,
    prefix: Tensor | None,
) -> list[Tensor]:
    """Summed log-probabilities of several continuations per context, the context read once.

    Scores what `scored_tokens` scores on the rows `context + continuation` (every chunk
    reading the memories of the context's chunks, as there), at the cost of one context pass
    instead of one per continuation: the contexts fill a decoding cache (`Memory3.prefill`),
    which is copied once per continuation (`KVCache.take_rows`) and extended by all its
    tokens in one pass.

    Args:
        model: The model.
        contexts: `B` token-id rows, each starting with `<s>`.
        continuations: Per context, its continuations (each at least one token).
        memories: One-chunk memories per context (`B` rows; the memories every chunk of the
            row reads), or None to read none.
        prefix: The reference prefix ids (memory mode), or None for warmup mode (then
            `memories` must be None).

    Returns:
        Per context, `(n_i,)` float32 summed log-probabilities of its `n_i` continuations.
    """
    if prefix is None:
        assert memories is None, "warmup mode reads no memories"
    device = next(model.parameters()).device
    idx, lengths = right_pad(contexts, 0)
    idx, lengths = idx.to(device), lengths.to(device)
    counts = torch.tensor([len(row) for row in continuations])
    tokens, ends = right_pad([c for row in continuations for c in row], 0)
    tokens, ends = tokens.to(device), ends.to(device)
    owner = torch.repeat_interleave(torch.arange(len(contexts)), counts).to(device)
    cache = model.new_cache(len(contexts), idx.shape[1] + tokens.shape[1], prefix=prefix)
    if memories is not None:
        chunks = math.ceil(idx.shape[1] / model.config.chunk_length)
        visible = memories.visible.expand(-1, chunks, -1)
        memories = Memories(memories.keys, memories.values, memories.valid, visible)
        memories = memories.to(device=device, dtype=next(model.parameters()).dtype)
    logits = model.prefill(idx, cache, lengths=lengths, memories=memories)
    last = logits[torch.arange(len(contexts), device=device), lengths - 1].float()
    total = torch.log_softmax(last, -1)[owner].gather(-1, tokens[:, :1])[:, 0]
    if tokens.shape[1] > 1:  # the continuations' own next tokens, read in one pass
        cache = cache.take_rows(owner)  # later chunks keep reading the context's memories
        logits = model.extend(tokens[:, :-1], cache, across_chunks=True).float()
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        scored = torch.arange(1, tokens.shape[1], device=device)[None] < ends[:, None]
        total = total + (logp * scored).sum(-1)
    return list(total.cpu().split(counts.tolist()))


def heldout_memories(
    retriever: Retriever,
    windows: list[list[int]],
    *,
    chunk_length: int,
    protocol: Literal["paper", "causal"],
) -> Memories:
    """The memories each chunk of held-out windows reads, under a retrieval protocol.

    Chunk `c` covers positions `c·64 .. c·64 + 63` of a window, its `<s>` included (the
    `<s>` is not text). `paper`: each chunk retrieves with its own text, references
    overlapping the window by more than the threshold dropped; `causal`: chunk `c` reads what
    chunk `c − 1`'s text retrieved (chunk 0 reads none), the filter checking each chunk's
    references against the text before them.

    Args:
        retriever: The retriever over the bank.
        windows: `B` token-id windows, each starting with `<s>`.
        chunk_length: Tokens per chunk (the model's `chunk_length`).
        protocol: "paper" or "causal".

    Returns:
        The pool, `C · k` memories per row in the per-chunk layout (`Retrieval.memories`).
    """
    chunk = chunk_length
    chunks = [[w[max(s, 1) : s + chunk] for s in range(0, len(w), chunk)] for w in windows]
    leaks = [w[1:] for w in windows]
    if protocol == "causal":  # chunk c reads what chunk c − 1 retrieved
        chunks, leaks = [[None, *c[:-1]] for c in chunks], None
    return retriever.retrieve(chunks, leak_texts=leaks).memories  # type: ignore[arg-type]
