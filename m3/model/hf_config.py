"""Hugging Face `config.json` ↔ m3 `Config`: which checkpoints m3's model computes exactly.

m3 reads four `model_type`s (SmolLM2 and TinyLlama are `llama` configs):

| `model_type` | what m3 sets | notes |
|---|---|---|
| `llama` | `attention_bias` (all four projections), `rope_scaling` | Llama 3.1/3.2: "llama3" |
| `mistral` | — | a `sliding_window` caps `block_size` |
| `qwen2` | `qkv_bias` (q/k/v only, always) | Qwen2, Qwen2.5; "yarn" for long contexts |
| `qwen3` | `qk_norm`, `attention_bias` | per-head RMSNorm of q and k before RoPE |

Everything that maps exactly is translated: rotary scaling "linear", "llama3" and "yarn"
(`m3.model.rope`), RMSNorm, SiLU or exact (erf) GELU. Everything else (another rotary
type, MLP biases, approximate GELUs, a partial rotary factor, a sliding window shorter than
the context, `smollm3`, whose layers skip RoPE, any other `model_type`) is refused with a
`UserError` that names the file and every such field at once, rather than loaded into a
model that would compute something else.

```python
from m3.model.hf_config import config_from_hf

config = config_from_hf("checkpoints/qwen2.5-0.5b", memory_layers=range(12))
```

The functions are re-exported by `m3.model.checkpoints`, which reads and writes the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from m3.core.errors import UserError
from m3.model.config import Config
from m3.model.rope import RopeScaling

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Values of `model_type` that map exactly onto m3's model."""

ARCHITECTURE_FIELDS = (
    "vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "mlp_hidden",
    "norm", "norm_eps", "activation", "rope_base", "rope_scaling", "tie_embeddings",
    "attention_bias", "qkv_bias", "qk_norm",
)  # fmt: skip
"""`Config` fields fixed by a checkpoint: the weights compute something else if they differ."""

FREE_FIELDS = (
    "name", "block_size", "memory_layers", "memory_tokens", "memories_per_chunk",
    "chunk_length", "reference_length", "context_offset", "init_std",
)  # fmt: skip
"""`Config` fields a checkpoint does not fix; `config_from_hf` takes them as overrides."""

_QWEN = {
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "num_key_value_heads": 32,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}
# Defaults of the fields transformers' config classes fill in when config.json omits them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    "mistral": {
        "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
        "num_key_value_heads": 8,
    },
    "qwen2": _QWEN,
    "qwen3": {**_QWEN, "head_dim": 128, "attention_bias": False},
}
# Types refused with a reason of their own.
_REFUSED = {
    "smollm3": "its layers skip RoPE (no_rope_layers: every fourth layer by default), and "
    "m3's model rotates every layer",
}
_REQUIRED = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
)  # fmt: skip
# hidden_act values whose function is exactly m3's activation ("gelu" is the erf GELU).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}


# ----------------------------------------------------------------------------- config.json
def read_hf_config(source: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The parsed config.json and a name for it in messages.

    Args:
        source: A checkpoint folder, the path of its config.json, or the parsed JSON.

    Returns:
        `(config, where)`: the JSON object and the file's path ("config" for a mapping).

    Raises:
        UserError: When the file is missing, unreadable or not a JSON object.
    """
    if isinstance(source, Mapping):
        return source, "config"
    path = Path(source)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise UserError(
            f"{path}: not found; a Hugging Face checkpoint folder holds {CONFIG_NAME} (the "
            f"architecture) next to {WEIGHTS_NAME} or {INDEX_NAME} and its shards"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable JSON config ({error})") from error
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data, str(path)


def config_from_hf(source: str | Path | Mapping[str, Any], **overrides: Any) -> Config:
    """Translate a Hugging Face `config.json` into an m3 `Config`.

    The architecture comes from the checkpoint: `hidden_size` → `n_embd`,
    `intermediate_size` → `mlp_hidden`, `num_hidden_layers` → `n_layer`,
    `num_attention_heads` → `n_head`, `num_key_value_heads` → `n_kv_head`, `head_dim`
    (default: `hidden_size / num_attention_heads`), `vocab_size`, `max_position_embeddings`
    → `block_size`, `rms_norm_eps` → `norm_eps`, `rope_theta` (or
    `rope_parameters.rope_theta`) → `rope_base`, `rope_scaling` / `rope_parameters` →
    `rope_scaling`, `tie_word_embeddings` → `tie_embeddings`, `hidden_act` →
    `activation`; Llama's and Qwen3's `attention_bias` → `attention_bias`, Qwen2's q/k/v
    biases → `qkv_bias`, Qwen3's q/k norms → `qk_norm`. Fields config.json omits take the
    defaults of transformers' class for that `model_type` (for Llama: as many key/value
    heads as heads, 2048 positions, untied; for Qwen3: `head_dim` 128); the five sizes are
    required.

    A sliding window shorter than `max_position_embeddings` (Mistral's `sliding_window`;
    Qwen's with `use_sliding_window`) caps `block_size`: up to the window, sliding-window
    attention is plain causal attention.

    The memory settings are m3's defaults, those saved by `save_hf_checkpoint` under the
    `m3` key of config.json, or the overrides.

    Args:
        source: A checkpoint folder, the path of its config.json, or the parsed JSON.
        **overrides: Values of the fields the checkpoint does not fix (`FREE_FIELDS`):
            `memory_layers`, `memory_tokens`, `memories_per_chunk`, `chunk_length`,
            `reference_length`, `context_offset`, `block_size`, `init_std`, `name`.

    Returns:
        The config.

    Raises:
        UserError: When config.json is missing or unreadable, when an override is unknown or
            would change the architecture, or when the checkpoint computes something m3's
            model cannot (all such problems in one message, each naming its field).
    """
    hf, where = read_hf_config(source)
    bad = sorted(set(overrides) - set(FREE_FIELDS))
    if bad:
        fixed = sorted(set(bad) & set(ARCHITECTURE_FIELDS))
        why = f"; {fixed} are fixed by the checkpoint's weights" if fixed else ""
        raise UserError(
            f"config_from_hf: cannot override {bad}{why}. Allowed: {sorted(FREE_FIELDS)}"
        )
    fields, window = _architecture(hf, where)
    saved = hf.get("m3")
    if isinstance(saved, Mapping):
        fields.update({k: v for k, v in saved.items() if k in FREE_FIELDS})
    if window is not None and overrides.get("block_size") is None:
        fields["block_size"] = min(fields["block_size"], window)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if fields.get("memory_layers") is not None:
        fields["memory_layers"] = tuple(fields["memory_layers"])
    if window is not None and fields["block_size"] > window:
        raise UserError(
            f"{where}: block_size {fields['block_size']} exceeds sliding_window {window}; "
            "m3 has no sliding-window attention, which only differs from plain causal "
            f"attention beyond {window} tokens: use block_size <= {window}"
        )
    return Config(**fields)


def config_to_hf(config: Config, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The Hugging Face `config.json` of a model computing what an m3 model computes.

    A Llama, unless the config has Qwen3's q/k norms (a Qwen3) or Qwen2's q/k/v biases (a
    Qwen2). m3's memory settings (and `name`, `init_std`) are kept under the key `m3`, which
    transformers keeps as an attribute and `config_from_hf` reads back.

    Args:
        config: The m3 config.
        dtype: The dtype the weights are stored in, recorded in the config.

    Returns:
        The JSON-serialisable config.

    Raises:
        UserError: For a config none of these classes expresses (LayerNorm; q/k norms with
            q/k/v-only biases).
    """
    if config.norm != "rmsnorm":
        raise UserError(
            f"config {config.name!r} uses norm={config.norm!r}; the Hugging Face Llama layout "
            "has RMSNorm only, so this model cannot be saved as a Llama checkpoint"
        )
    if config.qk_norm and config.qkv_bias:
        raise UserError(
            f"config {config.name!r} has qk_norm with qkv_bias; Qwen3 has q/k norms with "
            "biases on all four projections or none: use attention_bias instead of qkv_bias"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    free = config.to_dict()
    memory = {k: free[k] for k in FREE_FIELDS if k != "block_size"}
    if config.context_offset == config.reference_length:  # the default: let it follow
        del memory["context_offset"]
    scaling = config.rope_scaling.to_dict() if config.rope_scaling else None
    family: dict[str, Any]
    if config.qk_norm:
        family = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
        family.update(attention_bias=config.attention_bias, use_sliding_window=False)
    elif config.qkv_bias:
        family = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        family.update(use_sliding_window=False)
    else:
        family = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        family.update(attention_bias=config.attention_bias, mlp_bias=False)
    return {
        **family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": config.activation,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": scaling,
        "rope_parameters": {
            **(scaling or {"rope_type": "default"}),
            "rope_theta": config.rope_base,
        },
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "m3": memory,
    }


# ----------------------------------------------------------------------------- translation
def _architecture(hf: Mapping[str, Any], where: str) -> tuple[dict[str, Any], int | None]:
    """`Config` fields fixed by the checkpoint, and its sliding window; refuse what m3 lacks."""
    model_type = hf.get("model_type")
    if model_type in _REFUSED:
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported: {_REFUSED[model_type]}"
        )
    if model_type not in _DEFAULTS:
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported; m3 loads the Llama-style "
            f"architectures: model_type one of {list(SUPPORTED_MODEL_TYPES)}"
        )
    if "num_key_value_heads" in hf and hf["num_key_value_heads"] is None:  # null: as many as heads
        hf = {**hf, "num_key_value_heads": hf.get("num_attention_heads")}
    hf = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise UserError(f"{where}: missing {missing}, needed to build the model")
    problems: list[str] = []
    if model_type == "llama" and hf.get("mlp_bias"):
        problems.append("mlp_bias is true, but m3's MLP is bias-free")
    act = hf["hidden_act"]
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        problems.append(
            f"hidden_act {act!r} is not supported: m3 has {sorted(_ACTIVATIONS)} (with 'gelu' "
            "the exact erf GELU; tanh approximations would give other logits)"
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(
            f"partial_rotary_factor is {hf['partial_rotary_factor']}; m3 rotates whole heads"
        )
    rope_base, scaling = _rope(hf, problems)
    window = _window(hf, model_type, problems)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if isinstance(heads, int) and heads > 0 and hf["hidden_size"] % heads:
            problems.append(
                f"head_dim is not given and hidden_size {hf['hidden_size']} is not a multiple "
                f"of num_attention_heads {heads}"
            )
        head_dim = hf["hidden_size"] // heads if isinstance(heads, int) and heads > 0 else 0
    if problems:
        raise UserError(f"{where}: cannot load this checkpoint into m3: " + "; ".join(problems))
    fields = {
        "vocab_size": hf["vocab_size"],
        "n_layer": hf["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": hf.get("num_key_value_heads", heads),
        "head_dim": head_dim,
        "n_embd": hf["hidden_size"],
        "mlp_hidden": hf["intermediate_size"],
        "block_size": hf["max_position_embeddings"],
        "norm": "rmsnorm",
        "norm_eps": float(hf["rms_norm_eps"]),
        "activation": _ACTIVATIONS[act],
        "rope_base": rope_base,
        "rope_scaling": scaling,
        "tie_embeddings": bool(hf["tie_word_embeddings"]),
        # Mistral's and Qwen2's classes read no attention_bias: they have none / q/k/v always
        "attention_bias": model_type in ("llama", "qwen3") and bool(hf.get("attention_bias")),
        "qkv_bias": model_type == "qwen2",
        "qk_norm": model_type == "qwen3",
    }
    return fields, window


def _window(hf: Mapping[str, Any], model_type: str, problems: list[str]) -> int | None:
    """The sliding window some layers attend within, or None when every layer is full."""
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type not in ("qwen2", "qwen3"):
        return None
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types")
    if types is None:
        layers = hf["num_hidden_layers"]
        sliding = isinstance(layers, int) and layers > hf.get("max_window_layers", 28)
        return window if sliding else None
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        problems.append(f"layer_types {unknown} are not supported: m3 has full attention")
    return window if "sliding_attention" in types else None


def _rope(hf: Mapping[str, Any], problems: list[str]) -> tuple[float, RopeScaling | None]:
    """RoPE's base and scaling: `rope_theta`, `rope_scaling` (4.x), `rope_parameters` (5.x)."""
    theta = hf.get("rope_theta")
    found: dict[str, RopeScaling] = {}
    for key in ("rope_scaling", "rope_parameters"):
        spec = hf.get(key)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            problems.append(f"{key} must be an object, got {spec!r}")
            continue
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"{key}.partial_rotary_factor is not 1; m3 rotates whole heads")
        if key == "rope_parameters" and spec.get("rope_theta") is not None:
            if "rope_theta" in hf and not math.isclose(hf["rope_theta"], spec["rope_theta"]):
                problems.append(
                    f"rope_theta {hf['rope_theta']} and rope_parameters.rope_theta "
                    f"{spec['rope_theta']} disagree"
                )
            theta = spec["rope_theta"]
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind == "default":
            continue
        params = {k: v for k, v in spec.items() if k not in ("partial_rotary_factor",)}
        if kind in ("llama3", "yarn") and params.get("original_max_position_embeddings") is None:
            # as transformers: the top-level field if there is one, else the context length
            original = hf.get("original_max_position_embeddings", hf["max_position_embeddings"])
            params["original_max_position_embeddings"] = original
        if kind == "yarn" and params.get("factor") is None:
            original = params["original_max_position_embeddings"]
            params["factor"] = hf["max_position_embeddings"] / original
        try:
            found[key] = RopeScaling.from_dict(params, where=key)
        except UserError as error:
            problems.append(str(error))
    if len(found) == 2 and found["rope_scaling"] != found["rope_parameters"]:
        problems.append("rope_scaling and rope_parameters describe different rotary scalings")
    scaling = found.get("rope_scaling", found.get("rope_parameters"))
    return (10000.0 if theta is None else float(theta)), scaling
