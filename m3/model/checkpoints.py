"""Pretrained Llama-family checkpoints in the Hugging Face layout, read and written.

A Hugging Face checkpoint folder holds `config.json` and its weights in safetensors files:
one `model.safetensors`, or shards listed by `model.safetensors.index.json`. m3's model is
a bias-free Llama with the same weight names (without the `model.` prefix) and the same
"rotate half" rotary embedding, so such weights load as they are, with no permutation:

```python
from m3.model.checkpoints import load_hf_checkpoint, save_hf_checkpoint

model = load_hf_checkpoint("checkpoints/llama-1b", memory_layers=range(8))
logits = model(idx)                              # the pretrained model, warmup mode
save_hf_checkpoint(model, "runs/continual/hf")   # and back, for Hugging Face tools
```

Only what maps exactly is accepted: `model_type` "llama" or "mistral", RMSNorm, SiLU or
exact (erf) GELU, plain RoPE. Everything else (rotary scaling, biases, Qwen2's q/k/v
biases, approximate GELUs, a sliding window shorter than the context) is refused with a
`UserError` naming the field, rather than loaded into a model that would compute something
else. The memory settings are m3's own: they default to m3's (the first half of the
layers read memories) and can be set with keyword arguments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from m3.core.errors import UserError
from m3.model.config import Config
from m3.model.memory3 import Memory3, RotaryEmbedding

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
"""Values of `model_type` that map exactly onto m3's model."""

ARCHITECTURE_FIELDS = (
    "vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "mlp_hidden",
    "norm", "norm_eps", "activation", "rope_base", "tie_embeddings",
)  # fmt: skip
"""`Config` fields fixed by a checkpoint: the weights compute something else if they differ."""

FREE_FIELDS = (
    "name", "block_size", "memory_layers", "memory_tokens", "memories_per_chunk",
    "chunk_length", "reference_length", "context_offset", "init_std",
)  # fmt: skip
"""`Config` fields a checkpoint does not fix; `config_from_hf` takes them as overrides."""

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
}
_REQUIRED = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
)  # fmt: skip
# hidden_act values whose function is exactly m3's activation ("gelu" is the erf GELU).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}
# Tensors some conversions store although they follow from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- config
def config_from_hf(source: str | Path | Mapping[str, Any], **overrides: Any) -> Config:
    """Translate a Hugging Face `config.json` into an m3 `Config`.

    The architecture comes from the checkpoint: `hidden_size` → `n_embd`,
    `intermediate_size` → `mlp_hidden`, `num_hidden_layers` → `n_layer`,
    `num_attention_heads` → `n_head`, `num_key_value_heads` → `n_kv_head`, `head_dim`
    (default: `hidden_size / num_attention_heads`), `vocab_size`, `max_position_embeddings`
    → `block_size`, `rms_norm_eps` → `norm_eps`, `rope_theta` (or
    `rope_parameters.rope_theta`) → `rope_base`, `tie_word_embeddings` → `tie_embeddings`,
    `hidden_act` → `activation`. Fields config.json omits take the defaults of
    transformers' class for that `model_type` (for Llama: as many key/value heads as heads,
    2048 positions, untied); the five sizes are required.

    A Mistral `sliding_window` shorter than `max_position_embeddings` caps `block_size`:
    up to the window, sliding-window attention is plain causal attention.

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
    hf, where = _read_config(source)
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
    """The Hugging Face `config.json` of a Llama computing what an m3 model computes.

    m3's memory settings (and `name`, `init_std`) are kept under the key `m3`, which
    transformers keeps as an attribute and `config_from_hf` reads back.

    Args:
        config: The m3 config.
        dtype: The dtype the weights are stored in, recorded in the config.

    Returns:
        The JSON-serialisable config.

    Raises:
        UserError: For a config Llama cannot express (LayerNorm).
    """
    if config.norm != "rmsnorm":
        raise UserError(
            f"config {config.name!r} uses norm={config.norm!r}; the Hugging Face Llama layout "
            "has RMSNorm only, so this model cannot be saved as a Llama checkpoint"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    free = config.to_dict()
    memory = {k: free[k] for k in FREE_FIELDS if k != "block_size"}
    if config.context_offset == config.reference_length:  # the default: let it follow
        del memory["context_offset"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "m3": memory,
    }


def _read_config(source: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The parsed config.json and a name for it in messages."""
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


def _architecture(hf: Mapping[str, Any], where: str) -> tuple[dict[str, Any], int | None]:
    """`Config` fields fixed by the checkpoint, and its sliding window; refuse what m3 lacks."""
    model_type = hf.get("model_type")
    if model_type == "qwen2":
        raise UserError(
            f"{where}: model_type 'qwen2' is not supported: Qwen2 always adds biases to "
            "q_proj, k_proj and v_proj, and m3's attention is bias-free"
        )
    if model_type not in _DEFAULTS:
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported; m3 loads the bias-free "
            f"Llama architecture: model_type one of {list(SUPPORTED_MODEL_TYPES)}"
        )
    if "num_key_value_heads" in hf and hf["num_key_value_heads"] is None:  # null: as many as heads
        hf = {**hf, "num_key_value_heads": hf.get("num_attention_heads")}
    hf = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise UserError(f"{where}: missing {missing}, needed to build the model")
    problems: list[str] = []
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key} is true, but m3's layers are bias-free")
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
    rope_base = _rope_base(hf, problems)
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
    window = hf.get("sliding_window") if model_type == "mistral" else None
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
        "tie_embeddings": bool(hf["tie_word_embeddings"]),
    }
    return fields, window


def _rope_base(hf: Mapping[str, Any], problems: list[str]) -> float:
    """RoPE's base from `rope_theta` (transformers 4) or `rope_parameters` (transformers 5)."""
    theta = hf.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        spec = hf.get(key)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            problems.append(f"{key} must be an object, got {spec!r}")
            continue
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            problems.append(
                f"{key} asks for {kind!r} rotary scaling; m3 has plain RoPE only, so the "
                "model would see other positions than it was trained with"
            )
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"{key}.partial_rotary_factor is not 1; m3 rotates whole heads")
        if key == "rope_parameters" and spec.get("rope_theta") is not None:
            if "rope_theta" in hf and not math.isclose(hf["rope_theta"], spec["rope_theta"]):
                problems.append(
                    f"rope_theta {hf['rope_theta']} and rope_parameters.rope_theta "
                    f"{spec['rope_theta']} disagree"
                )
            theta = spec["rope_theta"]
    return 10000.0 if theta is None else float(theta)


# ----------------------------------------------------------------------------- weights
def load_hf_state_dict(
    directory: str | Path, config: Config, *, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Read a checkpoint's weights under m3's names, checked against a config.

    Names lose their `model.` prefix; with tied embeddings `lm_head.weight` is the
    embedding (a stored copy is ignored, as transformers ignores it). Stored
    `rotary_emb.inv_freq` buffers are skipped: they follow from `rope_theta`.

    Args:
        directory: The checkpoint folder.
        config: The m3 config the weights are for (usually `config_from_hf(directory)`).
        dtype: Dtype of the returned tensors; the stored dtype when None (float32 when
            the checkpoint mixes floating dtypes).

    Returns:
        The state dict of `Memory3(config)`.

    Raises:
        UserError: When the weights are missing or unreadable, or do not fit the config:
            every missing, unexpected, bias and wrongly shaped tensor in one message.
    """
    directory = Path(directory)
    stored = _read_weights(directory)
    state: dict[str, Tensor] = {}
    for name, tensor in stored.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        state[name.removeprefix("model.")] = tensor
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Memory3(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    problems = _weight_problems(state, expected)
    if problems:
        raise UserError(
            f"{directory}: the weights do not fit the model its {CONFIG_NAME} describes "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    if dtype is None:
        floating = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = floating.pop() if len(floating) == 1 else torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _weight_problems(
    state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Every way `state` differs from the expected names and shapes."""
    problems = []
    for name in sorted(expected.keys() - state.keys()):
        problems.append(f"missing tensor {name} {expected[name]}")
    for name in sorted(state.keys() - expected.keys()):
        shape = tuple(state[name].shape)
        if name.endswith(".bias"):
            problems.append(f"bias {name} {shape}: m3's layers are bias-free")
        else:
            problems.append(f"unexpected tensor {name} {shape}")
    for name in sorted(expected.keys() & state.keys()):
        shape = tuple(state[name].shape)
        if shape != expected[name]:
            problems.append(f"{name}: checkpoint has shape {shape}, m3 expects {expected[name]}")
    return problems


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of `model.safetensors`, or of the shards its index lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = _shards(index)
    else:
        others = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
        hint = (
            f"; found {others}: m3 reads safetensors only (never pickles), convert with "
            "transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`"
            if others
            else ""
        )
        raise UserError(
            f"{directory}: no weights found: expected {WEIGHTS_NAME}, or {INDEX_NAME} with the "
            f"shards it lists{hint}"
        )
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file, device="cpu"))
        except (OSError, SafetensorError) as error:
            raise UserError(f"{file}: not a readable safetensors file ({error})") from error
    return tensors


def _shards(index: Path) -> list[Path]:
    """The shard files a `model.safetensors.index.json` lists, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(
            f"{index}: not a safetensors index (a JSON object with a 'weight_map' from "
            f"tensor names to shard files): {error}"
        ) from error
    files = [index.parent / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{index}: lists shards that are not in {index.parent}: {missing}")
    return files


# ----------------------------------------------------------------------------- models
def load_hf_checkpoint(
    directory: str | Path, *, dtype: torch.dtype | None = None, **overrides: Any
) -> Memory3:
    """Build an m3 model from a Hugging Face Llama-family checkpoint folder.

    The model is built without random initialisation (its parameters are the loaded
    tensors), so large checkpoints load without holding a second copy.

    Args:
        directory: The folder holding config.json and the safetensors weights.
        dtype: Dtype of the parameters; the stored dtype when None (float32 when the
            checkpoint mixes floating dtypes). The rotary frequencies stay float32.
        **overrides: m3's own settings (see `config_from_hf`), e.g.
            `memory_layers=range(8)`, `block_size=4096`.

    Returns:
        The model, on the CPU, in training mode like any new module.

    Raises:
        UserError: See `config_from_hf` and `load_hf_state_dict`.
    """
    config = config_from_hf(directory, **overrides)
    state = load_hf_state_dict(directory, config, dtype=dtype)
    with torch.device("meta"):
        model = Memory3(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # a non-persistent buffer is not in the state dict: compute it for real
    model.rotary = RotaryEmbedding(
        config.head_dim, base=config.rope_base, scaling=config.rope_scaling
    )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a new parameter or buffer this loader does not know
        raise RuntimeError(f"m3.model.checkpoints does not know how to fill {left}")
    return model


def load_hf_weights(model: Memory3, directory: str | Path) -> None:
    """Copy a Hugging Face checkpoint's weights into an existing model, in place.

    The model's architecture must be the checkpoint's (its memory settings and
    `block_size` are its own); parameters keep their dtype and device.

    Args:
        model: The model to fill, e.g. a `Memory3Module`'s `model`.
        directory: The checkpoint folder.

    Raises:
        UserError: When the model's config differs from the checkpoint's (every field,
            with the value to set), or as `load_hf_state_dict`.
    """
    own = model.config
    ckpt = config_from_hf(directory, **{k: getattr(own, k) for k in FREE_FIELDS})
    differ = [
        f"{field}: {getattr(ckpt, field)!r} (the model has {getattr(own, field)!r})"
        for field in ARCHITECTURE_FIELDS
        if getattr(ckpt, field) != getattr(own, field)
    ]
    if differ:
        raise UserError(
            f"{directory}: the checkpoint's architecture differs from the model's; set in the "
            "model config: " + "; ".join(differ)
        )
    state = load_hf_state_dict(directory, own)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def load_weights(model: Memory3, path: str | Path) -> None:
    """Load weights into a model from a state dict, a Lightning checkpoint or a HF folder.

    The one loader behind `training.init_weights` (`Memory3Module.load_weights`) and
    inference (`m3.inference.loading.load_inference`).

    Args:
        model: The model to fill, in place.
        path: A `.pt` state dict (a stage's `model.pt`), a Lightning `.ckpt` (its `model.*`
            weights are used), or a Hugging Face Llama-family folder.

    Raises:
        UserError: For a missing file, or weights of another shape (naming the tensor).
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face folder (config.json + *.safetensors)
        load_hf_weights(model, path)
        return
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = {
            k.removeprefix("model."): v
            for k, v in state["state_dict"].items()
            if k.startswith("model.")
        }
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise UserError(
                f"{path}: weight {name} has shape {tuple(tensor.shape)}, this model's is "
                f"{tuple(own[name].shape)} — was the checkpoint written with another config?"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state)


def save_hf_checkpoint(
    model: Memory3, directory: str | Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Write a model as a Hugging Face Llama checkpoint: `config.json` + `model.safetensors`.

    transformers' `LlamaForCausalLM.from_pretrained(directory)` computes the same logits as
    the model in warmup mode; `load_hf_checkpoint(directory)` gives back the same model,
    memory settings included, bit for bit. With tied embeddings `lm_head.weight` is not
    stored (the Hugging Face convention).

    Args:
        model: The model.
        directory: The folder to write into (created when missing); its `config.json`
            and `model.safetensors` are overwritten.
        dtype: Dtype to store the weights in; the model's when None.

    Returns:
        The folder.

    Raises:
        UserError: For a model Llama cannot express (LayerNorm), or a folder that already
            holds a sharded checkpoint.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        raise UserError(
            f"{directory}: holds a sharded checkpoint ({INDEX_NAME}); writing "
            f"{WEIGHTS_NAME} next to it would leave two sets of weights: choose an empty folder"
        )
    state = model.state_dict()
    dtype = dtype or state["embed_tokens.weight"].dtype
    hf_config = config_to_hf(model.config, dtype=dtype)
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            if model.config.tie_embeddings:
                continue
            key = name
        else:
            key = f"model.{name}"
        tensors[key] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return directory
