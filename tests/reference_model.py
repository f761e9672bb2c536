"""A slow, obviously-correct Memory³ forward pass, written independently of `m3.model.memory3`.

It reads the model's weights by name and recomputes everything in float64, one sequence at a
time and one chunk at a time: each chunk's keys are built by plain concatenation (prefix and
context so far, plus the memory tokens that chunk may see) and attention is an explicit
softmax. The tests pin `m3.model.memory3` against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from m3.core.memories import Memories
from m3.model.memory3 import Memory3


def _norm(x: Tensor, weight: Tensor, kind: str, eps: float) -> Tensor:
    if kind == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps) * weight


def _act(x: Tensor, kind: str) -> Tensor:
    if kind == "silu":
        return x / (1 + torch.exp(-x))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _frequencies(dim: int, base: float, scaling) -> tuple[list[float], float]:
    """Each pair's rotation frequency and the cos/sin factor, in Python floats.

    Plain RoPE: base^(-2i/d). The scalings are written from their definitions (linear
    position interpolation; Llama 3.1's wavelength bands; YaRN's ramp over the dimensions
    by their rotations within the original context, and its attention factor).
    """
    plain = [base ** (-2 * i / dim) for i in range(dim // 2)]
    if scaling is None:
        return plain, 1.0
    kind, factor = scaling.rope_type, scaling.factor
    if kind == "linear":
        return [f / factor for f in plain], 1.0
    original = scaling.original_max_position_embeddings
    if kind == "llama3":
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        out = []
        for f in plain:
            wavelength = 2 * math.pi / f
            if wavelength < original / high:
                out.append(f)
            elif wavelength > original / low:
                out.append(f / factor)
            else:
                smooth = (original / wavelength - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out, 1.0
    assert kind == "yarn"

    def dimension(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dimension(scaling.beta_fast or 32), dimension(scaling.beta_slow or 1)
    if scaling.truncate is not False:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    out = []
    for i, f in enumerate(plain):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep f, 1: f / factor
        out.append(f * (1 - ramp) + f / factor * ramp)
    attention = scaling.attention_factor
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return out, attention


def _rope(x: Tensor, positions: list[int], base: float, scaling=None) -> Tensor:
    """x: (S, heads, d). Pair i rotates with pair i + d/2 by angle pos * frequency_i."""
    out = x.clone()
    half = x.shape[-1] // 2
    frequencies, scale = _frequencies(x.shape[-1], base, scaling)
    for s, pos in enumerate(positions):
        for i in range(half):
            angle = pos * frequencies[i]
            c, sn = scale * math.cos(angle), scale * math.sin(angle)
            a, b = x[s, :, i], x[s, :, i + half]
            out[s, :, i] = a * c - b * sn
            out[s, :, i + half] = b * c + a * sn
    return out


def _softmax_weights(q: Tensor, keys: Tensor, allowed: Tensor) -> Tensor:
    """q (R, d), keys (N, d), allowed (R, N) bool: explicit softmax weights per row."""
    scores = q @ keys.T / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
    return weights / weights.sum(-1, keepdim=True)


def reference_forward(
    model: Memory3,
    idx: Tensor,
    memories: Memories | None = None,
    prefix: list[int] | None = None,
    capture: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] | None = None,
    shares: Tensor | None = None,
) -> Tensor:
    """Logits (B, T, V) in float64 through a per-chunk loop (see the module docstring).

    With `capture`, each row appends its per-layer (q before RoPE, k before RoPE, k after
    RoPE, v), each (S, heads, d), to it. With `shares` (L_mem, B, H, T), each context token's
    softmax mass on memory tokens is written into it, per memory layer and head.
    """
    cfg = model.config
    w = {name: t.detach().double().cpu() for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        w["lm_head.weight"] = w["embed_tokens.weight"]
    heads, kv_heads, dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    group = heads // kv_heads
    memory_layers = list(cfg.memory_layers or ())
    results = []
    for row in range(idx.shape[0]):
        tokens = idx[row].tolist()
        if memories is None:
            width, seq, positions = 0, tokens, list(range(len(tokens)))
        else:
            assert prefix
            width = len(prefix)
            seq = prefix + tokens
            start = width + cfg.context_offset
            positions = list(range(width)) + [start + t for t in range(len(tokens))]
        length = len(seq)
        # the rows attending together: the prefix, then each chunk of the context
        blocks = [(0, width, None)] if width else []
        for c, s in enumerate(range(0, len(tokens), cfg.chunk_length)):
            blocks.append((width + s, width + min(s + cfg.chunk_length, len(tokens)), c))
        h = w["embed_tokens.weight"][seq]
        if capture is not None:
            capture.append([])
        for layer in range(cfg.n_layer):
            p = f"layers.{layer}."
            a = _norm(h, w[p + "input_layernorm.weight"], cfg.norm, cfg.norm_eps)
            q, k, v = (
                a @ w[p + f"self_attn.{n}_proj.weight"].T + w.get(p + f"self_attn.{n}_proj.bias", 0)
                for n in "qkv"
            )
            q, k, v = (
                q.view(length, heads, dim),
                k.view(length, kv_heads, dim),
                v.view(length, kv_heads, dim),
            )
            if cfg.qk_norm:  # per head, before RoPE
                q = _norm(q, w[p + "self_attn.q_norm.weight"], "rmsnorm", cfg.norm_eps)
                k = _norm(k, w[p + "self_attn.k_norm.weight"], "rmsnorm", cfg.norm_eps)
            q_raw, k_raw = q, k
            scaling = cfg.rope_scaling
            q, k = (
                _rope(q, positions, cfg.rope_base, scaling),
                _rope(k, positions, cfg.rope_base, scaling),
            )
            if capture is not None:
                capture[-1].append((q_raw, k_raw, k, v))
            att = torch.zeros(length, heads, dim, dtype=torch.float64)
            for begin, end, chunk in blocks:
                for head in range(heads):
                    kv = head // group
                    mem_keys, mem_values = [], []
                    if memories is not None and chunk is not None and layer in memory_layers:
                        j = memory_layers.index(layer)
                        for m in range(memories.num_memories):
                            if memories.visible[row, chunk, m]:
                                keep = memories.valid[row, m].cpu()
                                mem_keys.append(memories.keys[row, m, j, kv].cpu()[keep])
                                mem_values.append(memories.values[row, m, j, kv].cpu()[keep])
                    n_mem = sum(len(x) for x in mem_keys)
                    keys = torch.cat([*(x.double() for x in mem_keys), k[:end, kv]])
                    values = torch.cat([*(x.double() for x in mem_values), v[:end, kv]])
                    rows_abs = torch.arange(begin, end)[:, None]
                    causal = torch.arange(end)[None, :] <= rows_abs
                    allowed = torch.cat(
                        [torch.ones(end - begin, n_mem, dtype=torch.bool), causal], 1
                    )
                    weights = _softmax_weights(q[begin:end, head], keys, allowed)
                    att[begin:end, head] = weights @ values
                    if shares is not None and chunk is not None and layer in memory_layers:
                        j = memory_layers.index(layer)
                        mass = weights[:, :n_mem].sum(-1)
                        shares[j, row, head, begin - width : end - width] = mass
            h = h + att.reshape(length, heads * dim) @ w[p + "self_attn.o_proj.weight"].T
            h = h + w.get(p + "self_attn.o_proj.bias", 0)
            a = _norm(h, w[p + "post_attention_layernorm.weight"], cfg.norm, cfg.norm_eps)
            gate = _act(a @ w[p + "mlp.gate_proj.weight"].T, cfg.activation)
            up = a @ w[p + "mlp.up_proj.weight"].T
            h = h + (gate * up) @ w[p + "mlp.down_proj.weight"].T
        h = _norm(h, w["norm.weight"], cfg.norm, cfg.norm_eps)
        results.append(h[width:] @ w["lm_head.weight"].T)
    return torch.stack(results)
