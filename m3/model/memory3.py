"""The Memory³ decoder: a Llama-style transformer whose memory layers read explicit memories.

Two modes, one model (paper §3.2, §3.4):

- **warmup mode** (`memories=None`): an ordinary causal decoder — normal BOS, positions from 0;
- **memory mode**: the reference prefix `<s>Reference:` is prepended as an attention sink at
  every layer (its own rows see no memories); in the memory layers every token of chunk `c`
  attends, in one softmax, to the memory tokens chunk `c` may see and to the causal context.
  Positions are parallel: the prefix takes `0..b−1`, memories keep the positions
  `b..b+reference_length−1` baked into their stored keys, the context's BOS sits at
  `b + context_offset`.

A whole prompt or training sequence is processed in one pass. In a memory layer, the memory
part is computed for all chunks at once (each chunk against its own few memory tokens), and
merged into a single causal `scaled_dot_product_attention` call over the context through one
extra *anchor* key whose score for query `i` equals the log-sum-exp of `i`'s memory scores:
the kernel's softmax then spreads exactly the right mass over the context and reports the
memory share in one extra value channel. The result is the paper's one softmax over memory
and context, differentiable end to end, at the cost of the causal kernel plus one head
dimension.

Decoding keeps a KV cache of the prefix and context and a memory slot per sequence
(`KVCache`), which is swapped every chunk without recomputing the context cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3.core.memories import Memories
from m3.model.config import Config


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (no bias), computed in fp32.

    Args:
        dim: Size of the last dimension.
        eps: Added to the mean square for stability.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise over the last dimension, in fp32, and scale.

        Args:
            x: `(..., dim)` hidden states.

        Returns:
            `(..., dim)` in the dtype of `x`.
        """
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def build_norm(config: Config) -> nn.Module:
    """The normalisation layer the config asks for (RMSNorm or bias-free LayerNorm).

    Args:
        config: The model config.

    Returns:
        A module normalising the last dimension of size `config.n_embd`.
    """
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)


class GatedMLP(nn.Module):
    """Bias-free gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU with silu, GeGLU with gelu).

    Args:
        config: The model config (`n_embd`, `mlp_hidden`, `activation`).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.act = F.silu if config.activation == "silu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated MLP.

        Args:
            x: `(B, T, n_embd)` normalised hidden states.

        Returns:
            `(B, T, n_embd)`.
        """
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the "rotate half" convention (as Hugging Face Llama).

    Args:
        head_dim: Dimension of one head (even).
        base: Frequency base.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base

    @property
    def inv_freq(self) -> Tensor:
        """The rotation frequencies, `(head_dim / 2,)`, always fp32.

        Computed rather than stored, so that casting the model to bf16 cannot blur long
        positions.
        """
        exponents = torch.arange(0, self.head_dim, 2) / self.head_dim
        return 1.0 / self.base ** exponents.float()

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Cosines and sines for integer positions.

        Args:
            positions: `(B, T)` or `(T,)` long.

        Returns:
            `(cos, sin)`, each fp32 of shape `(B or 1, 1, T, head_dim)`.
        """
        if positions.dim() == 1:
            positions = positions[None]
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply rotary position embeddings (computed in fp32).

    Args:
        x: `(B, H, T, d)` queries or keys.
        cos: `(B|1, 1, T, d)` cosines of the angles (`RotaryEmbedding`).
        sin: `(B|1, 1, T, d)` sines of the same angles.

    Returns:
        `(B, H, T, d)` rotated, in the dtype of `x`.
    """
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class LayerStates(NamedTuple):
    """One layer's attention inputs for a batch of token sequences (see `Memory3.reference_states`).

    Attributes:
        queries: Queries before RoPE, `(N, H, T, d_h)`.
        keys: Keys before RoPE, `(N, H_kv, T, d_h)`.
        rotated_keys: Keys after RoPE, `(N, H_kv, T, d_h)`: what a memory stores.
        values: Values, `(N, H_kv, T, d_h)`.
    """

    queries: Tensor
    keys: Tensor
    rotated_keys: Tensor
    values: Tensor


@dataclass
class _MemoryPlan:
    """Which memories every chunk of this call sees, computed once and used by every layer."""

    index: Tensor  # (B, C, M_c) pool indices
    valid: Tensor  # (B, C, M_c * k) bool: memory token slot takes part
    chunk_length: int  # queries per chunk (1 when decoding)

    def gather(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """One layer's memories per chunk: `(B, M, H_kv, k, d)` -> `(B, C, M_c, H_kv, k, d)`."""
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None, None]
        return keys[rows, self.index], values[rows, self.index]


@dataclass
class _Step:
    """What one call of the model needs in every layer."""

    prefix_length: int  # rows of the input that are the reference prefix
    decode: bool  # one new token per row, keys taken from the cache
    key_mask: Tensor | None = None  # (B, 1, T, S) when decoding
    slots: Tensor | None = None  # (B, T) cache slots of each row's new tokens when decoding
    memory: _MemoryPlan | None = None
    # buffer index of cache slot 0 (the cache's memory region comes first) and the first
    # buffer index a decoding step attends to: 0 in a layer reading its cached memories
    cache_offset: int = 0
    window_start: int = 0


class Attention(nn.Module):
    """Grouped-query self-attention with an optional explicit-memory part.

    Args:
        config: The model config.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        #: When a list, every memory-mode call appends the share of attention each query put
        #: on memory tokens, `(B, H, T)` (`m3.inference.diagnostics.memory_attention`); None
        #: records nothing.
        self.memory_shares: list[Tensor] | None = None

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project to queries, keys and values, before RoPE.

        Args:
            x: `(B, T, n_embd)`.

        Returns:
            `q (B, H, T, d_h)`, `k (B, H_kv, T, d_h)`, `v (B, H_kv, T, d_h)`.
        """
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        step: _Step,
        memory: tuple[Tensor, Tensor] | None,
        cache: tuple[Tensor, Tensor] | None,
        capture: list[LayerStates] | None = None,
    ) -> Tensor:
        """Attend over the context (and memories in a memory layer).

        Args:
            x: `(B, T, n_embd)` normalised hidden states.
            cos: RoPE cosines `(B|1, 1, T, d_h)`.
            sin: RoPE sines, same shape.
            step: The call's plan.
            memory: This layer's memories per chunk, keys and values `(B, C, M_c, H_kv, k, d_h)`,
                or None in a layer without memory.
            cache: This layer's cached keys and values `(B, H_kv, S_max, d_h)`, or None.
            capture: When given, this layer's `LayerStates` are appended to it.

        Returns:
            `(B, T, n_embd)`.
        """
        q_raw, k_raw, v = self.qkv(x)
        q, k = apply_rotary(q_raw, cos, sin), apply_rotary(k_raw, cos, sin)
        if capture is not None:
            capture.append(LayerStates(q_raw, k_raw, k, v))
        if cache is not None:
            k, v = _write_cache(cache, k, v, step)
        if memory is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=step.key_mask, is_causal=not step.decode, enable_gqa=True
            )
        else:
            out, share = _attend_with_memory(q, k, v, *memory, step)
            if self.memory_shares is not None:
                self.memory_shares.append(share.detach()[..., step.prefix_length :])
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def _write_cache(
    cache: tuple[Tensor, Tensor], k: Tensor, v: Tensor, step: _Step
) -> tuple[Tensor, Tensor]:
    """Store new keys/values in the cache; return the keys/values to attend over."""
    cache_k, cache_v = cache
    offset = step.cache_offset
    if not step.decode:  # prefill: the whole (prefix +) prompt from slot 0
        length = k.shape[2]
        cache_k[:, :, offset : offset + length] = k
        cache_v[:, :, offset : offset + length] = v
        return k, v
    assert step.slots is not None and step.key_mask is not None
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    # advanced indices first: the indexed view is (B, T, H_kv, d_h)
    cache_k[rows, :, offset + step.slots] = k.transpose(1, 2)
    cache_v[rows, :, offset + step.slots] = v.transpose(1, 2)
    end = step.window_start + step.key_mask.shape[-1]
    return cache_k[:, :, step.window_start : end], cache_v[:, :, step.window_start : end]


def _memory_attention(
    q: Tensor, mem_k: Tensor, mem_v: Tensor, valid: Tensor, chunk_length: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Each chunk's queries against that chunk's memory tokens, in fp32.

    Args:
        q: `(B, H, T, d)` context queries, token 0 starting chunk 0.
        mem_k: `(B, C, M_c, H_kv, k, d)` memory keys per chunk.
        mem_v: Same shape: memory values.
        valid: `(B, C, M_c·k)` bool.
        chunk_length: Queries per chunk.
        scale: Softmax scale.

    Returns:
        `(out, lse)`: the memory-only attention output `(B, H, T, d)` (fp32) and the log-sum-exp
        of the memory scores `(B, H, T)`; a query with no valid memory token gets a score far
        below any real one (never −inf, so that gradients stay finite).
    """
    batch, heads, length, dim = q.shape
    chunks, kv_heads = mem_k.shape[1], mem_k.shape[3]
    groups = heads // kv_heads
    padded = chunks * chunk_length
    queries = F.pad(q.float(), (0, 0, 0, padded - length))
    queries = queries.view(batch, kv_heads, groups, chunks, chunk_length, dim)
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


def _attend_with_memory(
    q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, step: _Step
) -> tuple[Tensor, Tensor]:
    """One softmax over memory tokens and the causal context, in a single SDPA call.

    The memory part of query `i` is summarised by its log-sum-exp `lse_i` and output `o_i`.
    An extra *anchor* key (zero key, one extra channel set to 1) gets score `lse_i` for query
    `i` through an extra query channel `lse_i / scale`; its value is the one-hot extra channel.
    The kernel's softmax then returns `(Z_ctx · out_ctx) / (Z_ctx + Z_mem)` in the first `d`
    channels and the memory share `Z_mem / (Z_ctx + Z_mem)` in the extra one.

    Returns:
        The attention output `(B, H, T, d)` and the memory share `(B, H, T)`.
    """
    assert step.memory is not None
    scale = 1.0 / math.sqrt(q.shape[-1])
    prefix = step.prefix_length
    mem_out, lse = _memory_attention(
        q[:, :, prefix:], mem_k, mem_v, step.memory.valid, step.memory.chunk_length, scale
    )
    if step.decode:
        return _decode_with_memory(q, k, v, mem_out, lse, step.key_mask, scale)
    if prefix:  # the prefix's own rows see no memories
        mem_out = F.pad(mem_out, (0, 0, prefix, 0))
        lse = F.pad(lse, (prefix, 0), value=torch.finfo(torch.float32).min)
    # far enough below any real score to vanish, small enough to stay finite in q's dtype
    floor = -min(1e4, torch.finfo(q.dtype).max * scale / 4)
    anchor_score = (lse.clamp(min=floor) / scale).to(q.dtype)

    batch, kv_heads, _, dim = k.shape
    q2 = torch.cat([q, anchor_score[..., None]], dim=-1)
    k2 = F.pad(k, (0, 1))
    v2 = F.pad(v, (0, 1))
    anchor = k.new_zeros(batch, kv_heads, 1, dim + 1)
    anchor[..., -1] = 1
    k2, v2 = torch.cat([anchor, k2], dim=2), torch.cat([anchor, v2], dim=2)
    # a leading dummy query keeps the causal alignment: query i sees the anchor and keys 0..i
    q2 = F.pad(q2, (0, 0, 1, 0))
    out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=scale, enable_gqa=True)
    out = out[:, :, 1:]
    memory_share = out[..., -1:]
    return out[..., :-1] + memory_share * mem_out.to(out.dtype), memory_share[..., 0]


def _decode_with_memory(
    q: Tensor, k: Tensor, v: Tensor, mem_out: Tensor, mem_lse: Tensor, mask: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Decoding steps' attention: context and memory parts merged by their log-sum-exps.

    A step has few queries, so the context part is computed directly (fp32) instead of
    through the anchor key, which would copy the whole cache in every memory layer.

    Args:
        q: `(B, H, T, d)` queries of the new tokens.
        k: `(B, H_kv, S, d)` cached keys, new ones included.
        v: Same shape: cached values.
        mem_out: `(B, H, T, d)` fp32 memory-only attention output.
        mem_lse: `(B, H, T)` log-sum-exp of the memory scores.
        mask: `(B, 1, T, S)` bool: cache slots each new token may attend to.
        scale: Softmax scale.

    Returns:
        The attention output `(B, H, T, d)` and the memory share `(B, H, T)`.
    """
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    queries = q.float().reshape(batch, kv_heads, heads // kv_heads * length, dim)
    scores = queries @ k.float().transpose(-1, -2) * scale  # (B, H_kv, G·T, S)
    scores = scores.view(batch, heads, length, -1).masked_fill(~mask, float("-inf"))
    ctx_lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - ctx_lse[..., None]).reshape(batch, kv_heads, -1, scores.shape[-1])
    ctx_out = (probs @ v.float()).reshape(batch, heads, length, dim)
    total = torch.logaddexp(ctx_lse, mem_lse)
    share = torch.exp(mem_lse - total)
    out = torch.exp(ctx_lse - total)[..., None] * ctx_out + share[..., None] * mem_out
    return out.to(q.dtype), share.to(q.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: attention then gated MLP, each with a residual.

    Args:
        config: The model config.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = GatedMLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        step: _Step,
        memory: tuple[Tensor, Tensor] | None = None,
        cache: tuple[Tensor, Tensor] | None = None,
        capture: list[LayerStates] | None = None,
    ) -> Tensor:
        """Apply the block: pre-norm attention, then the pre-norm MLP, each with a residual.

        Args:
            x: `(B, T, n_embd)` hidden states.
            cos: RoPE cosines `(B|1, 1, T, d_h)`.
            sin: RoPE sines, same shape.
            step: The call's plan (see `Attention.forward`).
            memory: This layer's memories per chunk, keys and values
                `(B, C, M_c, H_kv, k, d_h)`, or None in a layer without memory.
            cache: This layer's cached keys and values `(B, H_kv, S_max, d_h)`, or None.
            capture: When given, this layer's `LayerStates` are appended to it.

        Returns:
            `(B, T, n_embd)`.
        """
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, memory, cache, capture)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Decoding state: cached keys/values of the prefix and context, plus the memory slot.

    Create one with `Memory3.new_cache`, fill it with `Memory3.prefill`, then call
    `Memory3.decode` once per new token. Rows hold prompts of different lengths (right
    padded); each row keeps its own length and chunk boundaries. In memory mode the memory
    slot holds, for every row, the memories its current chunk reads; swap them with
    `swap_memories` when a row starts a new chunk (`starts_chunk`). The context cache is
    never recomputed.

    The buffers start with a *memory region*: the current memories' keys and values laid out
    as cache slots `(B, H_kv, M·k, d_h)` in every memory layer, so that a decoding step reads
    memories and context in one attention call, as it would a longer context. It grows when
    a row's memories need more slots and is rewritten on each swap.

    Args:
        keys: Per layer `(B, H_kv, b + capacity, d_h)` buffers.
        values: Same shapes.
        prefix: The reference prefix ids `(b,)` in memory mode, None in warmup mode.
        chunk_length: Tokens per context chunk.
        memory_layers: Indices of the layers that read memories, in the order of the
            memories' `L_mem` axis.
    """

    def __init__(
        self,
        keys: list[Tensor],
        values: list[Tensor],
        *,
        prefix: Tensor | None,
        chunk_length: int,
        memory_layers: Sequence[int] = (),
    ) -> None:
        self.keys = keys
        self.values = values
        self.prefix = prefix
        self.chunk_length = chunk_length
        self.memory_layers = tuple(memory_layers)
        self.lengths = torch.zeros(keys[0].shape[0], dtype=torch.long, device=keys[0].device)
        self.memories: Memories | None = None
        #: Leading buffer slots of the memory region.
        self.memory_slots = 0
        #: `(B, memory_slots)` bool: the region's slots that hold a memory token of the row.
        self.memory_mask: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of rows `B`."""
        return self.keys[0].shape[0]

    @property
    def prefix_length(self) -> int:
        """Tokens of the reference prefix `b` (0 in warmup mode)."""
        return 0 if self.prefix is None else self.prefix.numel()

    @property
    def capacity(self) -> int:
        """Most context tokens a row can hold."""
        return self.keys[0].shape[2] - self.memory_slots - self.prefix_length

    @property
    def starts_chunk(self) -> Tensor:
        """`(B,)` bool: rows whose next token opens a new chunk."""
        return (self.lengths > 0) & (self.lengths % self.chunk_length == 0)

    def swap_memories(self, memories: Memories, rows: Tensor | None = None) -> None:
        """Replace the memories that some rows read from their next token on.

        Args:
            memories: One-chunk memories (`C = 1`) for the rows being swapped.
            rows: `(R,)` long indices of those rows; all rows when None.
        """
        if self.prefix is None:
            raise ValueError("this cache was created without a prefix: it is in warmup mode")
        if memories.num_chunks != 1:
            raise ValueError(
                f"swap_memories takes one-chunk memories, got {memories.num_chunks} chunks"
            )
        batch = self.batch_size
        if rows is None:
            rows = torch.arange(batch, device=self.lengths.device)
        if memories.batch_size != rows.numel():
            raise ValueError(f"got memories for {memories.batch_size} rows, {rows.numel()} to swap")
        memories = memories.to(device=self.keys[0].device, dtype=self.keys[0].dtype)
        current = self.memories
        if current is None:
            if rows.numel() != batch:
                raise ValueError("the first memories of a cache must be given for every row")
            layers, heads, tokens, dim = memories.keys.shape[2:]
            current = Memories.empty(
                batch,
                1,
                memory_shape=(layers, 2, heads, tokens, dim),
                device=memories.keys.device,
                dtype=memories.keys.dtype,
            )
        size = max(memories.num_memories, current.num_memories)
        current, memories = current.with_pool_size(size), memories.with_pool_size(size)
        # own the tensors before writing rows in place: they may be views of the caller's
        fields = ("keys", "values", "valid", "visible")
        current = Memories(*(getattr(current, name).clone() for name in fields))
        for name in fields:
            getattr(current, name)[rows] = getattr(memories, name)
        self.hold_memories(current)

    def hold_memories(self, memories: Memories) -> None:
        """Make `memories` the ones every row reads, and lay them out in the memory region.

        Args:
            memories: One-chunk memories (`C = 1`) for every row, in the cache's dtype.
        """
        batch, count, _, heads, tokens, dim = memories.keys.shape
        size = count * tokens
        if size > self.memory_slots:  # grow the region in front: a one-off copy
            grow = (0, 0, size - self.memory_slots, 0)
            self.keys = [F.pad(buffer, grow) for buffer in self.keys]
            self.values = [F.pad(buffer, grow) for buffer in self.values]
            self.memory_slots = size
        mask = memories.valid & memories.visible[:, 0, :, None]  # (B, M, k)
        self.memory_mask = F.pad(mask.flatten(1), (0, self.memory_slots - size))
        for j, layer in enumerate(self.memory_layers):
            # (B, M, H_kv, k, d) -> (B, H_kv, M·k, d)
            layout = (0, 2, 1, 3, 4)
            keys = memories.keys[:, :, j].permute(layout).reshape(batch, heads, size, dim)
            values = memories.values[:, :, j].permute(layout).reshape(batch, heads, size, dim)
            self.keys[layer][:, :, :size] = keys
            self.values[layer][:, :, :size] = values
        self.memories = memories


class Memory3(nn.Module):
    """The Memory³ language model.

    Args:
        config: The architecture (see `m3.model.config.Config`).

    Example:
        ```python
        model = Memory3(Config.from_name("tiny"))
        logits = model(idx)                                # warmup mode
        logits = model(idx, memories, prefix=prefix_ids)   # memory mode
        ```
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = build_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, base=config.rope_base)
        # layer index -> index along the memories' L_mem axis
        self.memory_slot = {layer: j for j, layer in enumerate(config.memory_layers or ())}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise weights: normal(0, init_std); residual outputs scaled by 1/sqrt(2·n_layer)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.dim() < 2:
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(param, std=std)

    def memory_fingerprint(self) -> str:
        """A fingerprint of everything the memories this model writes depend on.

        Memories depend on the config, the embeddings and the layers up to the last memory
        layer; a store records this fingerprint and refuses a model whose fingerprint differs
        (memories must be rebuilt whenever those weights change, paper §3.3).

        Returns:
            A sha256 hex digest.
        """
        settings = {k: v for k, v in self.config.to_dict().items() if k != "name"}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        last = max(self.config.memory_layers or (-1,))
        for name, tensor in sorted(self.state_dict().items()):
            if name.startswith("layers."):
                if int(name.split(".")[1]) > last:
                    continue
            elif not name.startswith("embed_tokens."):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def reference_states(self, idx: Tensor) -> list[LayerStates]:
        """Run references through the memory layers only and capture their attention inputs.

        This is the write path's forward (paper §3.3): each sequence attends only to itself,
        causally, with positions from 0, and the pass stops after the last memory layer's
        projections.

        Args:
            idx: `(N, T)` token ids: the reference prefix, then the reference, right-padded.

        Returns:
            One `LayerStates` per memory layer, in `config.memory_layers` order.
        """
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(
                f"idx must be (N, T) long token ids, got {idx.dtype} {tuple(idx.shape)}"
            )
        layers = self.config.memory_layers or ()
        if not layers:
            return []
        cos, sin = self.rotary(torch.arange(idx.shape[1], device=idx.device))
        step = _Step(prefix_length=0, decode=False)
        x = self.embed_tokens(idx)
        states: list[LayerStates] = []
        for i, block in enumerate(self.layers[: layers[-1]]):
            x = block(x, cos, sin, step, capture=states if i in self.memory_slot else None)
        # the last memory layer needs only its projections
        q, k, v = self.layers[layers[-1]].self_attn.qkv(self.layers[layers[-1]].input_layernorm(x))
        states.append(LayerStates(q, k, apply_rotary(k, cos, sin), v))
        return states

    # ----------------------------------------------------------------------------- full pass
    def forward(
        self, idx: Tensor, memories: Memories | None = None, *, prefix: Tensor | None = None
    ) -> Tensor:
        """Logits for every position of a batch of sequences, in one pass.

        Args:
            idx: `(B, T)` token ids; token 0 is the context's BOS.
            memories: None for warmup mode; otherwise the memory pool and its visibility map
                with `C = ceil(T / chunk_length)` chunks (`Memories.empty` for none).
            prefix: `(b,)` ids of the reference prefix `<s>Reference:`; required in memory mode.

        Returns:
            `(B, T, vocab_size)` logits.
        """
        return self._run_prompt(idx, memories, prefix, cache=None)

    # ----------------------------------------------------------------------------- decoding
    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        *,
        prefix: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty decoding cache.

        Args:
            batch_size: Rows `B`.
            capacity: Most context tokens per row (prompt plus generated).
            prefix: `(b,)` reference prefix ids for memory mode; None for warmup mode.
            dtype: Cache dtype; the model's parameter dtype when None.

        Returns:
            The cache.
        """
        param = self.lm_head.weight
        dtype = dtype or param.dtype
        if prefix is not None:
            prefix = self._check_prefix(prefix)
        slots = capacity + (0 if prefix is None else prefix.numel())
        shape = (batch_size, self.config.n_kv_head, slots, self.config.head_dim)
        keys = [param.new_zeros(shape, dtype=dtype) for _ in self.layers]
        values = [param.new_zeros(shape, dtype=dtype) for _ in self.layers]
        return KVCache(
            keys,
            values,
            prefix=prefix,
            chunk_length=self.config.chunk_length,
            memory_layers=self.config.memory_layers or (),
        )

    def prefill(
        self,
        idx: Tensor,
        cache: KVCache,
        *,
        lengths: Tensor | None = None,
        memories: Memories | None = None,
    ) -> Tensor:
        """Process a batch of prompts in one pass and fill the cache.

        Args:
            idx: `(B, T)` right-padded prompts.
            cache: An empty cache from `new_cache`.
            lengths: `(B,)` prompt lengths (1..T); all `T` when None.
            memories: Memories of the prompt chunks (as in `forward`) when the cache is in memory
                mode; None reads no memories. After the prompt, each row keeps the memories of
                its last prompt chunk until they are swapped.

        Returns:
            `(B, T, vocab_size)` logits; row `r`'s next-token logits are at `lengths[r] − 1`.
        """
        batch, length = idx.shape
        if cache.batch_size != batch:
            raise ValueError(f"cache has {cache.batch_size} rows, prompts have {batch}")
        if bool((cache.lengths > 0).any()):
            raise ValueError("prefill needs an empty cache")
        if length > cache.capacity:
            raise ValueError(
                f"prompts of {length} tokens exceed the cache capacity {cache.capacity}"
            )
        if lengths is None:
            lengths = torch.full((batch,), length, dtype=torch.long, device=idx.device)
        if bool(((lengths < 1) | (lengths > length)).any()):
            raise ValueError(f"prompt lengths must lie in 1..{length}, got {lengths.tolist()}")
        if cache.prefix is None and memories is not None:
            raise ValueError(
                "this cache is in warmup mode; create it with a prefix to read memories"
            )
        if cache.prefix is not None and memories is None:
            memories = self._no_memories(batch, length, idx.device)
        logits = self._run_prompt(idx, memories, cache.prefix, cache=cache)
        cache.lengths = lengths.to(device=cache.lengths.device, dtype=torch.long)
        if memories is not None:
            last_chunk = (cache.lengths - 1) // self.config.chunk_length
            cache.hold_memories(memories.for_chunks(last_chunk).to(dtype=cache.keys[0].dtype))
        return logits

    def decode(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Append one token per row and return the next-token logits.

        Args:
            tokens: `(B,)` the next token of each row.
            cache: A cache filled by `prefill`.

        Returns:
            `(B, vocab_size)` logits.
        """
        if tokens.shape != (cache.batch_size,):
            raise ValueError(
                f"decode takes ({cache.batch_size},) tokens, got {tuple(tokens.shape)}"
            )
        return self.extend(tokens[:, None], cache)[:, 0]

    def extend(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Append the same number of tokens to every row of a filled cache.

        In memory mode all new tokens read the cache's current memories, so they must lie in
        one chunk of each row (swap memories between chunks). Processing a long prompt chunk by
        chunk this way is the paper's loop; `prefill` does it in one pass.

        Args:
            tokens: `(B, T)` new tokens per row.
            cache: A cache filled by `prefill`.

        Returns:
            `(B, T, vocab_size)` logits.
        """
        batch, length = tokens.shape
        if batch != cache.batch_size:
            raise ValueError(f"cache has {cache.batch_size} rows, got tokens for {batch}")
        if bool((cache.lengths == 0).any()):
            raise ValueError("call prefill before decode or extend")
        if bool((cache.lengths + length > cache.capacity).any()):
            raise ValueError(f"the cache is full ({cache.capacity} context tokens per row)")
        chunk = self.config.chunk_length
        if cache.memories is not None and bool(
            (cache.lengths // chunk != (cache.lengths + length - 1) // chunk).any()
        ):
            raise ValueError(f"tokens appended at once must lie in one chunk of {chunk} tokens")
        prefix = cache.prefix_length
        offsets = torch.arange(length, device=cache.lengths.device)
        slots = prefix + cache.lengths[:, None] + offsets  # (B, T)
        positions = slots - prefix + (0 if cache.prefix is None else prefix + self._offset)
        used = int(slots.max()) + 1
        key_mask = torch.arange(used, device=slots.device) <= slots[..., None]  # (B, T, S)
        step = _Step(
            prefix_length=0,
            decode=True,
            key_mask=key_mask[:, None],
            slots=slots,
            cache_offset=cache.memory_slots,
            window_start=cache.memory_slots,
        )
        memory_step = None
        if cache.memories is not None and self._recording_shares():
            # the exact per-chunk path: it also measures the share of attention on memories
            step.memory = self._memory_plan(cache.memories, chunk_length=length)
        elif cache.memory_mask is not None:
            # memory layers attend over the memory region and the context in one call
            region = cache.memory_mask[:, None, None, :].expand(-1, 1, length, -1)
            memory_step = replace(
                step, key_mask=torch.cat([region, step.key_mask], dim=-1), window_start=0
            )
        logits = self._run_layers(tokens, positions, step, cache.memories, cache, memory_step)
        cache.lengths = cache.lengths + length
        return logits

    # ----------------------------------------------------------------------------- internals
    @property
    def _offset(self) -> int:
        return int(self.config.context_offset or 0)

    def _recording_shares(self) -> bool:
        return any(block.self_attn.memory_shares is not None for block in self.layers)

    def _check_prefix(self, prefix: Tensor) -> Tensor:
        if prefix.dim() != 1 or prefix.numel() == 0:
            raise ValueError(
                "memory mode needs the reference prefix as a non-empty 1-D tensor of ids, "
                f"got shape {tuple(prefix.shape)}"
            )
        return prefix.to(device=self.lm_head.weight.device, dtype=torch.long)

    def _no_memories(self, batch: int, length: int, device: torch.device) -> Memories:
        chunks = -(-length // self.config.chunk_length)
        return Memories.empty(batch, chunks, memory_shape=self.config.memory_shape, device=device)

    def _check_memories(self, memories: Memories, batch: int, length: int) -> None:
        config = self.config
        chunks = -(-length // config.chunk_length)
        expected = {
            "batch size": (memories.batch_size, batch),
            "memory layers (L_mem)": (memories.keys.shape[2], len(config.memory_layers or ())),
            "key/value heads (H_kv)": (memories.keys.shape[3], config.n_kv_head),
            "head dimension (d_h)": (memories.keys.shape[5], config.head_dim),
            f"chunks of {config.chunk_length} tokens": (memories.num_chunks, chunks),
        }
        for what, (got, want) in expected.items():
            if got != want:
                raise ValueError(
                    f"memories do not fit this model: {what} is {got}, expected {want}"
                )

    def _memory_plan(self, memories: Memories, *, chunk_length: int) -> _MemoryPlan | None:
        index, present = memories.visible_index()
        if index.shape[-1] == 0:
            return None
        rows = torch.arange(memories.batch_size, device=index.device)[:, None, None]
        valid = memories.valid[rows, index] & present[..., None]
        return _MemoryPlan(index=index, valid=valid.flatten(2), chunk_length=chunk_length)

    def _run_prompt(
        self, idx: Tensor, memories: Memories | None, prefix: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(
                f"idx must be (B, T) long token ids, got {idx.dtype} {tuple(idx.shape)}"
            )
        batch, length = idx.shape
        if length > self.config.block_size:
            raise ValueError(
                f"sequence of {length} tokens exceeds block_size {self.config.block_size}"
            )
        positions = torch.arange(length, device=idx.device)
        step = _Step(prefix_length=0, decode=False, cache_offset=cache.memory_slots if cache else 0)
        if memories is None:
            if prefix is not None:
                raise ValueError("a prefix is only used in memory mode: pass memories too")
            return self._run_layers(idx, positions, step, None, cache)
        if prefix is None:
            raise ValueError("memory mode needs the reference prefix ids (prefix=...)")
        prefix = self._check_prefix(prefix)
        self._check_memories(memories, batch, length)
        width = prefix.numel()
        idx = torch.cat([prefix.expand(batch, width), idx], dim=1)
        positions = torch.cat(
            [torch.arange(width, device=idx.device), positions + width + self._offset]
        )
        step.prefix_length = width
        step.memory = self._memory_plan(memories, chunk_length=self.config.chunk_length)
        return self._run_layers(idx, positions, step, memories, cache)[:, width:]

    def _run_layers(
        self,
        idx: Tensor,
        positions: Tensor,
        step: _Step,
        memories: Memories | None,
        cache: KVCache | None,
        memory_step: _Step | None = None,
    ) -> Tensor:
        # memory layers read `memories` per chunk or, with `memory_step`, the cache's region
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(idx)
        for i, block in enumerate(self.layers):
            memory, layer_step = None, step
            if i in self.memory_slot:
                if memory_step is not None:
                    layer_step = memory_step
                elif step.memory is not None and memories is not None:
                    j = self.memory_slot[i]
                    memory = step.memory.gather(memories.keys[:, :, j], memories.values[:, :, j])
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, cos, sin, layer_step, memory, layer_cache)
        return self.lm_head(self.norm(x))
