"""The Memory³ decoder: a Llama-style transformer whose memory layers read explicit memories.

Two modes, one model (paper §3.2, §3.4):

- **warmup mode** (`memories=None`): an ordinary causal decoder — normal BOS, positions from 0;
- **memory mode**: the reference prefix `<s>Reference:` is prepended as an attention sink at
  every layer (its own rows see no memories); in the memory layers every token of chunk `c`
  attends, in one softmax, to the memory tokens chunk `c` may see and to the causal context.
  Positions are parallel: the prefix takes `0..b−1`, memories keep the positions
  `b..b+reference_length−1` baked into their stored keys, the context's BOS sits at
  `b + context_offset`.

Read top to bottom: the norm, MLP and rotary embedding, `Attention`, `Block`, then `Memory3`,
whose `forward` is the whole pass (embed, prefix, blocks, norm, head). Two neighbours hold the
rest (docs: The model and explicit-memory attention):

- `m3.model.attention`: the memory part of a prompt's attention, computed for all chunks at
  once and merged into one causal kernel call by log-sum-exp (the anchor key);
- `m3.model.kv_cache`: the decoding cache, whose memory region in front of the context lets
  a decoding step read memories and context in one attention call; it is swapped every chunk
  without recomputing the context.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3.core.memories import Memories
from m3.model.attention import ChunkMemories, attend_with_memory
from m3.model.config import Config
from m3.model.kv_cache import KVCache
from m3.model.rope import RopeScaling, scaled_frequencies


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
        scaling: A rotary scaling schedule (`m3.model.rope`), or None for plain RoPE.
    """

    def __init__(
        self, head_dim: int, *, base: float = 10000.0, scaling: RopeScaling | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling

    @property
    def inv_freq(self) -> Tensor:
        """The rotation frequencies, `(head_dim / 2,)`, always fp32.

        Computed rather than stored, so that casting the model to bf16 cannot blur long
        positions.
        """
        exponents = torch.arange(0, self.head_dim, 2) / self.head_dim
        inv_freq = 1.0 / self.base ** exponents.float()
        if self.scaling is not None:
            return scaled_frequencies(inv_freq, self.scaling, base=self.base)
        return inv_freq

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
        if self.scaling is not None and self.scaling.cos_sin_factor != 1.0:  # yarn
            factor = self.scaling.cos_sin_factor
            return angles.cos() * factor, angles.sin() * factor
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
        queries: Queries before RoPE, `(N, H, T, d_h)` (after the bias and the q-norm, when
            the config has them).
        keys: Keys before RoPE, `(N, H_kv, T, d_h)` (after the bias and the k-norm).
        rotated_keys: Keys after RoPE (scaled, when the config scales it), `(N, H_kv, T,
            d_h)`: the keys the layer attends with, what a memory stores.
        values: Values, `(N, H_kv, T, d_h)`.
    """

    queries: Tensor
    keys: Tensor
    rotated_keys: Tensor
    values: Tensor


class Attention(nn.Module):
    """Grouped-query self-attention; in a memory layer it also reads explicit memories.

    It lives here, with the decoder, rather than in `m3.model.attention`: it is the Llama
    attention every layer has (projections, RoPE, the cache), and in a memory layer it hands
    the paper-specific part to `m3.model.attention.attend_with_memory`, which needs no weights.

    What a call computes depends on what it is given:

    - nothing more: causal attention over `x` (warmup mode, a layer without memory, or no
      chunk seeing any memory);
    - `memories`, in a memory layer: a prompt's one softmax over each chunk's memory tokens
      and the causal prefix-plus-context (paper §3.2), all chunks in one pass;
    - `kv_cache` alone: the same as without it, and the keys and values are stored (a prompt,
      `Memory3.prefill`);
    - `kv_cache`, `input_pos` and `mask`: a decoding step; the new tokens attend over the
      cache, where a memory layer's window starts with the memory region, so memories and
      context share one softmax.

    Args:
        config: The model config.
        block_idx: Index of the layer; it says whether the layer reads memories.
    """

    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.chunk_length = config.chunk_length
        self.block_idx = block_idx
        memory_layers = tuple(config.memory_layers or ())
        #: Position of this layer along the memories' `L_mem` axis; None if it reads none.
        self.memory_index = memory_layers.index(block_idx) if block_idx in memory_layers else None
        bias = config.attention_bias or config.qkv_bias  # Qwen2: q/k/v only
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(
            config.n_head * config.head_dim, config.n_embd, bias=config.attention_bias
        )
        #: Qwen3's per-head RMSNorm of queries and keys, before RoPE; None without `qk_norm`.
        self.q_norm = RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        #: When a list, every call that reads `memories` (a prompt in memory mode) appends the
        #: share of attention each context query put on memory tokens, `(B, H, T)`: the
        #: anchor channel of `m3.model.attention.anchored_causal_attention`,
        #: `exp(lse_memory − lse_all)`. Decoding steps record nothing. None records nothing
        #: (`m3.inference.diagnostics.memory_attention` sets and clears it).
        self.memory_shares: list[Tensor] | None = None

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project to queries, keys and values, before RoPE (after biases and q/k-norm).

        Args:
            x: `(B, T, n_embd)`.

        Returns:
            `q (B, H, T, d_h)`, `k (B, H_kv, T, d_h)`, `v (B, H_kv, T, d_h)`.
        """
        batch, length, _ = x.shape
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: norm each head
            q = self.q_norm(self.q_proj(x).view(batch, length, self.n_head, self.head_dim))
            k = self.k_norm(self.k_proj(x).view(batch, length, self.n_kv_head, self.head_dim))
            v = self.v_proj(x).view(batch, length, self.n_kv_head, self.head_dim)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = self.q_proj(x).view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        mask: Tensor | None = None,
        memories: ChunkMemories | None = None,
        prefix_length: int = 0,
        kv_cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        capture: list[LayerStates] | None = None,
    ) -> Tensor:
        """Attend over the context, and over memories in a memory layer.

        Args:
            x: `(B, T, n_embd)` normalised hidden states.
            cos: RoPE cosines `(B|1, 1, T, d_h)`.
            sin: RoPE sines, same shape.
            mask: With `input_pos`, `(B, 1, T, S)` bool: the first `S` slots of this layer's
                cache window each new token sees (`KVCache.update`); None for causal
                attention over `x` itself.
            memories: The memories each chunk of a prompt reads; only memory layers use them.
            prefix_length: Leading rows `b` of `x` that are the reference prefix: they see no
                memories.
            kv_cache: The decoding cache; this call's keys and values are stored in it.
            input_pos: `(B, T)` long cache slots of the new tokens of a decoding step (counted
                from the prefix); None for a prompt.
            capture: When given, this layer's `LayerStates` are appended to it.

        Returns:
            `(B, T, n_embd)`.
        """
        q_raw, k_raw, v = self.qkv(x)
        q, k = apply_rotary(q_raw, cos, sin), apply_rotary(k_raw, cos, sin)
        if capture is not None:
            capture.append(LayerStates(q_raw, k_raw, k, v))
        if kv_cache is not None:
            cached_k, cached_v = kv_cache.update(self.block_idx, k, v, input_pos)
            if input_pos is not None:  # a decoding step reads the cache (memory region first)
                assert mask is not None
                k, v = cached_k[:, :, : mask.shape[-1]], cached_v[:, :, : mask.shape[-1]]
        if memories is not None and self.memory_index is not None:
            mem_k, mem_v = memories.layer(self.memory_index)
            out, share = attend_with_memory(
                q,
                k,
                v,
                mem_k,
                mem_v,
                memories.valid,
                chunk_length=self.chunk_length,
                prefix_length=prefix_length,
            )
            if self.memory_shares is not None:
                self.memory_shares.append(share.detach()[..., prefix_length:])
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-norm transformer block: attention then gated MLP, each with a residual.

    Args:
        config: The model config.
        block_idx: Index of the layer (see `Attention`).
    """

    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = Attention(config, block_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = GatedMLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        mask: Tensor | None = None,
        memories: ChunkMemories | None = None,
        prefix_length: int = 0,
        kv_cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        capture: list[LayerStates] | None = None,
    ) -> Tensor:
        """Apply the block: pre-norm attention, then the pre-norm MLP, each with a residual.

        The arguments after `sin` go to the attention unchanged (see `Attention.forward`).

        Args:
            x: `(B, T, n_embd)` hidden states.
            cos: RoPE cosines `(B|1, 1, T, d_h)`.
            sin: RoPE sines, same shape.
            mask: A decoding step's `(B, 1, T, S)` bool cache mask, or None (causal).
            memories: The memories each chunk of a prompt reads (memory layers only).
            prefix_length: Leading rows of `x` that are the reference prefix.
            kv_cache: The decoding cache to store this call's keys and values in.
            input_pos: `(B, T)` cache slots of a decoding step's new tokens; None for a prompt.
            capture: When given, this layer's `LayerStates` are appended to it.

        Returns:
            `(B, T, n_embd)`.
        """
        h = self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            mask=mask,
            memories=memories,
            prefix_length=prefix_length,
            kv_cache=kv_cache,
            input_pos=input_pos,
            capture=capture,
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = build_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(
            config.head_dim, base=config.rope_base, scaling=config.rope_scaling
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise weights: normal(0, init_std); residual outputs scaled by 1/sqrt(2·n_layer).

        Norm weights start at one and biases (when the config has them) at zero.
        """
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(param)
            elif param.dim() < 2:
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

    # ----------------------------------------------------------------------------- full pass
    def forward(
        self,
        idx: Tensor,
        memories: Memories | None = None,
        *,
        prefix: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits for every position of a batch of sequences, in one pass.

        Args:
            idx: `(B, T)` token ids; token 0 is the context's BOS.
            memories: None for warmup mode; otherwise the memory pool and its visibility map
                with `C = ceil(T / chunk_length)` chunks (`Memories.empty` for none).
            prefix: `(b,)` ids of the reference prefix `<s>Reference:`; required in memory mode.
            cache: An empty cache to store every layer's keys and values in (what `prefill`
                does, which also records the lengths and memories: call that instead).

        Returns:
            `(B, T, vocab_size)` logits.
        """
        batch, length = self._check_idx(idx)
        if memories is None and prefix is not None:
            raise ValueError("a prefix is only used in memory mode: pass memories too")
        positions = torch.arange(length, device=idx.device)
        width, chunk_memories = 0, None
        if memories is not None:
            # memory mode (paper §3.2): the prefix in front of the context is the attention
            # sink; positions are parallel: the prefix at 0..b−1, the memories at the
            # reference positions b.. baked into their keys, the context after them
            prefix = self._check_prefix(prefix)
            self._check_memories(memories, batch, length)
            width = prefix.numel()
            # one embedding call over prefix and context: its weight gradient then sums in
            # the same order as always, so training rounds exactly as it did
            idx = torch.cat([prefix.expand(batch, width), idx], dim=1)
            offset = width + self._offset
            positions = torch.cat([torch.arange(width, device=idx.device), positions + offset])
            chunk_memories = ChunkMemories.of(memories)  # once per call, for every memory layer
        x = self.embed_tokens(idx)  # (B, b + T, n_embd)
        cos, sin = self.rotary(positions)
        for block in self.layers:
            x = block(x, cos, sin, memories=chunk_memories, prefix_length=width, kv_cache=cache)
        # the prefix's rows predict nothing, but the head runs over them too: the same matmul
        # shapes as always, so training rounds exactly as it did (the weight gradient sums
        # over every row)
        return self.lm_head(self.norm(x))[:, width:]

    def hidden_states(self, idx: Tensor, n_layers: int) -> Tensor:
        """Warmup-mode hidden states after the first `n_layers` blocks, before the final norm.

        Each sequence attends to itself, causally, with positions from 0 (as `forward`
        without memories).

        Args:
            idx: `(B, T)` token ids.
            n_layers: Blocks to run, `0..n_layer`.

        Returns:
            `(B, T, n_embd)`: the output of block `n_layers − 1` (the embeddings for 0).
        """
        self._check_ids(idx)
        cos, sin = self.rotary(torch.arange(idx.shape[1], device=idx.device))
        x = self.embed_tokens(idx)
        for block in self.layers[:n_layers]:
            x = block(x, cos, sin)
        return x

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
        self._check_ids(idx, rows="N")
        layers = self.config.memory_layers or ()
        if not layers:
            return []
        cos, sin = self.rotary(torch.arange(idx.shape[1], device=idx.device))
        x = self.embed_tokens(idx)
        states: list[LayerStates] = []
        for i, block in enumerate(self.layers[: layers[-1]]):
            x = block(x, cos, sin, capture=states if i in layers else None)
        # the last memory layer needs only its projections
        last = self.layers[layers[-1]]
        q, k, v = last.self_attn.qkv(last.input_layernorm(x))
        states.append(LayerStates(q, k, apply_rotary(k, cos, sin), v))
        return states

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
        logits = self(idx, memories, prefix=cache.prefix, cache=cache)
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

    def extend(self, tokens: Tensor, cache: KVCache, *, across_chunks: bool = False) -> Tensor:
        """Append the same number of tokens to every row of a filled cache.

        In memory mode all new tokens read the cache's current memories, so they must lie in
        one chunk of each row (swap memories between chunks), unless `across_chunks` says
        that the next chunks read the same memories. Processing a long prompt chunk by chunk
        this way is the paper's loop; `prefill` does it in one pass.

        Args:
            tokens: `(B, T)` new tokens per row.
            cache: A cache filled by `prefill`.
            across_chunks: Let the tokens cross chunk boundaries, every one of them reading
                the current memories (e.g. scoring continuations whose chunks all read the
                memories of the context's chunks).

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
        if (
            not across_chunks
            and cache.memories is not None
            and bool((cache.lengths // chunk != (cache.lengths + length - 1) // chunk).any())
        ):
            raise ValueError(f"tokens appended at once must lie in one chunk of {chunk} tokens")
        steps = torch.arange(length, device=cache.lengths.device)
        input_pos = cache.prefix_length + cache.lengths[:, None] + steps  # (B, T)
        # RoPE positions: the slot, moved past the memories' window in memory mode
        positions = input_pos + (0 if cache.prefix is None else self._offset)
        # each new token sees the prefix, the row's context and itself; in a memory layer
        # also the valid slots of the memory region, in the same softmax (paper §3.2)
        seen = torch.arange(int(input_pos.max()) + 1, device=input_pos.device)
        mask = (seen <= input_pos[..., None])[:, None]  # (B, 1, T, S)
        memory_mask = cache.with_memory_region(mask)  # (B, 1, T, R + S)
        memory_layers = self.config.memory_layers or ()
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(tokens)
        for i, block in enumerate(self.layers):
            x = block(
                x,
                cos,
                sin,
                mask=memory_mask if i in memory_layers else mask,
                kv_cache=cache,
                input_pos=input_pos,
            )
        cache.lengths = cache.lengths + length
        return self.lm_head(self.norm(x))

    # ----------------------------------------------------------------------------- internals
    @property
    def _offset(self) -> int:
        return int(self.config.context_offset or 0)

    @staticmethod
    def _check_ids(idx: Tensor, rows: str = "B") -> None:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(
                f"idx must be ({rows}, T) long token ids, got {idx.dtype} {tuple(idx.shape)}"
            )

    def _check_idx(self, idx: Tensor) -> tuple[int, int]:
        self._check_ids(idx)
        batch, length = idx.shape
        if length > self.config.block_size:
            raise ValueError(
                f"sequence of {length} tokens exceeds block_size {self.config.block_size}"
            )
        return batch, length

    def _check_prefix(self, prefix: Tensor | None) -> Tensor:
        if prefix is None:
            raise ValueError("memory mode needs the reference prefix ids (prefix=...)")
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
