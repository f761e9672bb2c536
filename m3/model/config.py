"""The model configuration: one typed dataclass with named presets.

```python
from m3.model.config import Config

config = Config.from_name("tiny")                  # a preset
config = Config.from_name("small", n_layer=8)      # a preset with overrides
config.memory_shape                                # (L_mem, 2, H_kv, k, d_h) of one memory
qwen = Config(qkv_bias=True, tie_embeddings=True)  # Qwen2-style attention
```

The default is the paper's Llama (§3.4). The options of the families people start from
(Llama 3.x rotary scaling, Qwen2's q/k/v biases, Qwen3's per-head q/k norms) are off by
default, and a config that leaves them off records none of them in `to_dict`, so the
fingerprints of existing banks and checkpoints do not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from m3.core.errors import UserError
from m3.model.rope import RopeScaling

Norm = Literal["rmsnorm", "layernorm"]
Activation = Literal["silu", "gelu"]


@dataclass(frozen=True)
class Config:
    """Architecture of a Memory³ model: a Llama-style decoder plus its explicit-memory settings.

    The memory mechanism adds no parameters: its settings say which layers read memories,
    how many tokens each memory keeps, and how positions are laid out (paper §3.1–§3.4).

    Attributes:
        name: Preset name, or "custom".
        vocab_size: Size of the embedding table (padded vocabulary).
        n_layer: Number of transformer blocks.
        n_head: Number of query heads.
        n_kv_head: Number of key/value heads (grouped-query attention); divides `n_head`.
        head_dim: Dimension of one attention head.
        n_embd: Hidden size.
        mlp_hidden: Width of the gated MLP.
        block_size: Longest context, in tokens, the model is trained for.
        norm: "rmsnorm" (default) or "layernorm" (bias-free), pre-norm in every block.
        norm_eps: Epsilon of the normalisation layers.
        activation: Activation of the gated MLP: "silu" (SwiGLU) or "gelu" (GeGLU).
        rope_base: Base of the rotary position embedding.
        rope_scaling: Rotary scaling of a long-context checkpoint (`m3.model.rope`:
            "linear", "llama3" or "yarn" and its parameters; a mapping is parsed); None
            for plain RoPE (the paper's).
        tie_embeddings: Share the input embedding with the output projection.
        attention_bias: Biases on all four attention projections, q/k/v and output
            (Llama's and Qwen3's `attention_bias`).
        qkv_bias: Biases on the q/k/v projections only, none on the output (Qwen2,
            Qwen2.5). At most one of `attention_bias` and `qkv_bias` is set.
        qk_norm: RMSNorm over each head of the queries and keys, after the projections and
            before RoPE (Qwen3's `q_norm` / `k_norm`, with `norm_eps`).
        memory_layers: Indices of the layers that read explicit memories; the first half of
            the layers when not given (the paper: 0–21 of 44).
        memory_tokens: Tokens kept per memory layer and key/value head of one reference (k).
        memories_per_chunk: Memories each chunk of context attends to.
        chunk_length: Tokens per context chunk; chunks are counted from the context's BOS.
        reference_length: Longest reference in tokens, after the reference prefix. Memories
            keep their reference positions, so this is also the width of the position
            window that all memories of a chunk share.
        context_offset: Positions between the end of the reference prefix and the context's
            BOS in memory mode; `reference_length` when not given.
        init_std: Standard deviation of the weight initialisation.
    """

    name: str = "custom"
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 16
    n_embd: int = 64
    mlp_hidden: int = 192
    block_size: int = 512
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Activation = "silu"
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    memory_layers: tuple[int, ...] | None = None
    memory_tokens: int = 8
    memories_per_chunk: int = 5
    chunk_length: int = 64
    reference_length: int = 128
    context_offset: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.memory_layers is None:
            object.__setattr__(self, "memory_layers", tuple(range(self.n_layer // 2)))
        else:
            object.__setattr__(self, "memory_layers", tuple(int(i) for i in self.memory_layers))
        if self.context_offset is None:
            object.__setattr__(self, "context_offset", self.reference_length)
        problems = []
        if isinstance(self.rope_scaling, Mapping):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
            except UserError as error:
                problems.append(str(error))
        problems += list(self._problems())
        if problems:
            raise UserError(f"invalid model config {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> Any:
        positive = (
            "vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "mlp_hidden",
            "block_size", "memory_tokens", "memories_per_chunk", "chunk_length", "reference_length",
        )  # fmt: skip
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                yield f"{key} must be a positive integer, got {value!r}"
        heads_ok = isinstance(self.n_head, int) and isinstance(self.n_kv_head, int)
        if heads_ok and self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            yield f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
        if isinstance(self.head_dim, int) and self.head_dim % 2:
            yield f"head_dim must be even for rotary embeddings, got {self.head_dim}"
        if self.norm not in ("rmsnorm", "layernorm"):
            yield f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}"
        if self.activation not in ("silu", "gelu"):
            yield f"activation must be 'silu' or 'gelu', got {self.activation!r}"
        if not self.norm_eps > 0:
            yield f"norm_eps must be positive, got {self.norm_eps!r}"
        if not self.rope_base > 0:
            yield f"rope_base must be positive, got {self.rope_base!r}"
        scaling = self.rope_scaling
        if scaling is not None and not isinstance(scaling, RopeScaling | Mapping):
            yield f"rope_scaling must be a mapping with a rope_type or None, got {scaling!r}"
        for key in _OPTIONS:
            if not isinstance(getattr(self, key), bool):
                yield f"{key} must be true or false, got {getattr(self, key)!r}"
        if self.attention_bias and self.qkv_bias:
            yield "set attention_bias (all four projections) or qkv_bias (q/k/v only), not both"
        layers = self.memory_layers or ()
        if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
            yield f"memory_layers must be increasing and distinct, got {list(layers)}"
        if any(not 0 <= i < self.n_layer for i in layers):
            yield f"memory_layers must lie in 0..{self.n_layer - 1}, got {list(layers)}"
        if not isinstance(self.context_offset, int) or self.context_offset < 0:
            yield f"context_offset must be a non-negative integer, got {self.context_offset!r}"

    @property
    def n_query_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_kv_head

    @property
    def memory_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one reference's memory: `(L_mem, 2 [K, V], H_kv, k, d_h)`."""
        return (len(self.memory_layers or ()), 2, self.n_kv_head, self.memory_tokens, self.head_dim)

    @property
    def memory_numel(self) -> int:
        """Numbers stored per reference (keys and values of every memory layer and head)."""
        numel = 1
        for size in self.memory_shape:
            numel *= size
        return numel

    @property
    def num_parameters(self) -> int:
        """Parameter count implied by the architecture (embeddings counted once when tied)."""
        attn = self.n_embd * self.head_dim * (2 * self.n_head + 2 * self.n_kv_head)
        if self.attention_bias or self.qkv_bias:
            attn += self.head_dim * (self.n_head + 2 * self.n_kv_head)
        if self.attention_bias:
            attn += self.n_embd
        mlp = 3 * self.n_embd * self.mlp_hidden
        norms = 2 * self.n_embd + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * self.n_embd * (1 if self.tie_embeddings else 2)
        return self.n_layer * (attn + mlp + norms) + embed + self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """Build a preset, optionally overriding some of its fields.

        Args:
            name: A preset name (see `Config.presets()`).
            **overrides: Fields to change, e.g. `n_layer=8`.

        Returns:
            The configuration.

        Raises:
            UserError: For an unknown preset or an unknown field.
        """
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        return cls.from_dict(fields, name=name if not overrides else f"{name}+custom")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, name: str | None = None) -> Config:
        """Build a configuration from a mapping of field values.

        Args:
            data: Field names and values; lists are accepted for `memory_layers`.
            name: Name to record when `data` holds none.

        Returns:
            The configuration.

        Raises:
            UserError: When `data` names a field that does not exist.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        data = dict(data)
        if data.get("memory_layers") is not None:
            data["memory_layers"] = tuple(data["memory_layers"])
        if name is not None:
            data.setdefault("name", name)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values (JSON/YAML-serialisable).

        The architecture options of other families (`rope_scaling`, `attention_bias`,
        `qkv_bias`, `qk_norm`) appear only when set: a paper-Llama config gives the same
        dict, and so the same fingerprints, as before they existed.
        """
        data = dataclasses.asdict(self)
        data["memory_layers"] = list(self.memory_layers or ())
        for key in _OPTIONS:
            if not data[key]:
                del data[key]
        if self.rope_scaling is None:
            del data["rope_scaling"]
        else:
            data["rope_scaling"] = self.rope_scaling.to_dict()
        return data

    @staticmethod
    def presets() -> list[str]:
        """Names of the shipped presets."""
        return sorted(PRESETS)


_OPTIONS = ("attention_bias", "qkv_bias", "qk_norm")

PRESETS: dict[str, dict[str, Any]] = {
    # Trains in seconds on a CPU; byte-level or small BPE vocabularies fit in 512 ids.
    "tiny": dict(
        vocab_size=512,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        n_embd=64,
        mlp_hidden=192,
        block_size=512,
        memory_layers=(0, 1),
    ),
    # The benchmark size: ~8.4M parameters with an 8k vocabulary.
    "small": dict(
        vocab_size=8192,
        n_layer=6,
        n_head=8,
        n_kv_head=2,
        head_dim=32,
        n_embd=256,
        mlp_hidden=704,
        block_size=2048,
        memory_layers=(0, 1, 2),
    ),
    # Memory3-2.4B as published (paper §3.4).
    "paper-2.4b": dict(
        vocab_size=60416,
        n_layer=44,
        n_head=40,
        n_kv_head=8,
        head_dim=80,
        n_embd=3200,
        mlp_hidden=3200,
        block_size=2048,
        memory_layers=tuple(range(22)),
        memory_tokens=8,
        memories_per_chunk=5,
        chunk_length=64,
        reference_length=128,
    ),
}
