"""Memory attention: one softmax over a chunk's memory tokens and its causal context.

In a memory layer every token of chunk `c` attends, in **one softmax**, to the memory tokens
chunk `c` may see and to the causal context (paper §3.1–§3.2). The paper computes this chunk
by chunk; m3 computes a whole prompt in one pass (docs: The model and explicit-memory
attention, "One pass, no chunk loop"):

1. `memory_part`: each chunk's queries against that chunk's own few memory tokens, all chunks
   at once, in fp32. Query `i` gets the memory-only output `o_i` and the log-sum-exp of its
   memory scores `lse_i = log Z_mem,i`.
2. `anchored_causal_attention`: one causal `scaled_dot_product_attention` call over the
   prefix and context with one extra **anchor** key in front: a zero key with one extra
   channel set to 1, met by an extra query channel `lse_i / scale`, so that its score is
   exactly `lse_i`. Its value is a one-hot extra channel. The kernel's softmax then weighs
   the context by `Z_ctx / (Z_ctx + Z_mem)` and returns the memory share
   `Z_mem / (Z_ctx + Z_mem) = exp(lse_mem − lse_all)` in the extra channel.
3. `attend_with_memory`: output = context part + memory share × `o_i`, the single softmax of
   the paper, differentiable end to end (gradients reach the memory keys and values).

Decoding does not come here: a decoding step reads the memories from the KV cache's memory
region, as extra cache slots in front of the context (`m3.model.kv_cache`), in the same
softmax as the context.

The `Attention` module is not here but in `m3.model.memory3`, with the rest of the decoder:
it owns the projections, RoPE and the cache, as any Llama attention does, and calls
`attend_with_memory` in a memory layer. What lives here is only what is specific to Memory³,
as functions of tensors (no weights, no config), to be read and tested on their own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from m3.core.memories import Memories


class ChunkMemories(NamedTuple):
    """The memory tokens every chunk of one call reads, shared by the call's memory layers.

    `ChunkMemories.of` builds it once per call from a pool and its visibility map; each memory
    layer then gathers its own keys and values with `layer`.

    Attributes:
        keys: `(B, M, L_mem, H_kv, k, d_h)` the pool's post-RoPE keys (`Memories.keys`).
        values: Same shape: the pool's values.
        index: `(B, C, M_c)` long: the pool memories chunk `c` sees, padded to the largest
            count `M_c` of any chunk.
        valid: `(B, C, M_c·k)` bool: the memory token slots that take part (a real token of a
            visible memory, not padding).
    """

    keys: Tensor
    values: Tensor
    index: Tensor
    valid: Tensor

    @classmethod
    def of(cls, memories: Memories) -> ChunkMemories | None:
        """Which memory tokens each chunk reads.

        Args:
            memories: The pool and its visibility map, `C` chunks.

        Returns:
            The chunks' memories, or None when no chunk sees any memory (attention is then
            plain prefix-plus-context attention).
        """
        index, present = memories.visible_index()
        if index.shape[-1] == 0:
            return None
        rows = torch.arange(memories.batch_size, device=index.device)[:, None, None]
        valid = memories.valid[rows, index] & present[..., None]
        return cls(memories.keys, memories.values, index, valid.flatten(2))

    def layer(self, j: int) -> tuple[Tensor, Tensor]:
        """One memory layer's keys and values, per chunk.

        Args:
            j: Index along the `L_mem` axis (the position of the layer in
                `Config.memory_layers`).

        Returns:
            `(keys, values)`, each `(B, C, M_c, H_kv, k, d_h)`.
        """
        rows = torch.arange(self.index.shape[0], device=self.index.device)[:, None, None]
        return self.keys[:, :, j][rows, self.index], self.values[:, :, j][rows, self.index]


def memory_part(
    q: Tensor, mem_k: Tensor, mem_v: Tensor, valid: Tensor, chunk_length: int
) -> tuple[Tensor, Tensor]:
    """Each chunk's queries against that chunk's memory tokens, in fp32.

    Args:
        q: `(B, H, T, d_h)` context queries after RoPE; token 0 starts chunk 0.
        mem_k: `(B, C, M_c, H_kv, k, d_h)` memory keys per chunk (`ChunkMemories.layer`).
        mem_v: Same shape: memory values.
        valid: `(B, C, M_c·k)` bool: memory token slots that take part.
        chunk_length: Queries per chunk.

    Returns:
        `(out, lse)`: the memory-only attention output `(B, H, T, d_h)` (fp32) and the
        log-sum-exp of the memory scores `(B, H, T)`. A query with no valid memory token gets
        a score near the lowest finite fp32 value, never −inf, so that gradients stay finite.
    """
    batch, heads, length, dim = q.shape
    chunks, kv_heads = mem_k.shape[1], mem_k.shape[3]
    scale = 1.0 / math.sqrt(dim)
    groups = heads // kv_heads
    padded = chunks * chunk_length
    queries = F.pad(q.float(), (0, 0, 0, padded - length))
    queries = queries.view(batch, kv_heads, groups, chunks, chunk_length, dim)
    # (B, C, M_c, H_kv, k, d) -> (B, H_kv, C, M_c·k, d): a chunk's memory tokens side by side
    keys = mem_k.float().permute(0, 3, 1, 2, 4, 5).reshape(batch, kv_heads, chunks, -1, dim)
    values = mem_v.float().permute(0, 3, 1, 2, 4, 5).reshape(batch, kv_heads, chunks, -1, dim)
    scores = torch.einsum("bhgcld,bhcsd->bhgcls", queries, keys) * scale
    blocked = ~valid[:, None, None, :, None, :]
    scores = scores.masked_fill(blocked, torch.finfo(torch.float32).min)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).masked_fill(blocked, 0.0)
    out = torch.einsum("bhgcls,bhcsd->bhgcld", probs, values)
    out = out.reshape(batch, heads, padded, dim)[:, :, :length]
    return out, lse.reshape(batch, heads, padded)[:, :, :length]


def anchored_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Causal attention over the context that leaves room for a memory part of mass `exp(lse)`.

    One extra anchor key in front of the context takes score `lse_i` for query `i` (see the
    module docstring), so the kernel's softmax runs over `Z_ctx + Z_mem` in one call.

    Args:
        q: `(B, H, T, d_h)` queries after RoPE.
        k: `(B, H_kv, T, d_h)` keys after RoPE (query `i` sees keys `0..i`).
        v: Same shape: values.
        lse: `(B, H, T)` fp32 log-sum-exp of each query's memory scores (`memory_part`).

    Returns:
        `(out, share)`: the context output already weighted by `Z_ctx / (Z_ctx + Z_mem)`,
        `(B, H, T, d_h)`, and the memory share `Z_mem / (Z_ctx + Z_mem)`, `(B, H, T, 1)`,
        both in the dtype of `q`.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    # far enough below any real score to vanish, small enough to stay finite in q's dtype
    floor = -min(1e4, torch.finfo(q.dtype).max * scale / 4)
    anchor_score = (lse.clamp(min=floor) / scale).to(q.dtype)
    batch, kv_heads, _, dim = k.shape
    q2 = torch.cat([q, anchor_score[..., None]], dim=-1)
    anchor = k.new_zeros(batch, kv_heads, 1, dim + 1)
    anchor[..., -1] = 1
    k2 = torch.cat([anchor, F.pad(k, (0, 1))], dim=2)
    v2 = torch.cat([anchor, F.pad(v, (0, 1))], dim=2)
    # a leading dummy query keeps the causal alignment: query i sees the anchor and keys 0..i
    q2 = F.pad(q2, (0, 0, 1, 0))
    out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=scale, enable_gqa=True)
    out = out[:, :, 1:]
    return out[..., :-1], out[..., -1:]


def attend_with_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    valid: Tensor,
    *,
    chunk_length: int,
    prefix_length: int = 0,
) -> tuple[Tensor, Tensor]:
    """One softmax over each chunk's memory tokens and the causal context (paper §3.2).

    Args:
        q: `(B, H, b + T, d_h)` queries after RoPE: the reference prefix, then the context.
        k: `(B, H_kv, b + T, d_h)` keys after RoPE.
        v: Same shape: values.
        mem_k: `(B, C, M_c, H_kv, k, d_h)` this layer's memory keys per chunk.
        mem_v: Same shape: memory values.
        valid: `(B, C, M_c·k)` bool: memory token slots that take part.
        chunk_length: Context tokens per chunk.
        prefix_length: Rows `b` of the reference prefix; they see no memories (paper §3.2:
            the prefix is the attention sink).

    Returns:
        `(out, share)`: the attention output `(B, H, b + T, d_h)` and the share of each
        query's attention on memory tokens `(B, H, b + T)` (0 on the prefix rows), in the
        dtype of `q`.
    """
    mem_out, lse = memory_part(q[:, :, prefix_length:], mem_k, mem_v, valid, chunk_length)
    if prefix_length:  # the prefix's own rows see no memories
        mem_out = F.pad(mem_out, (0, 0, prefix_length, 0))
        lse = F.pad(lse, (prefix_length, 0), value=torch.finfo(torch.float32).min)
    context, share = anchored_causal_attention(q, k, v, lse)
    return context + share * mem_out.to(context.dtype), share[..., 0]
