"""Pretrained Llama-family checkpoints in the Hugging Face layout, read and written.

A Hugging Face checkpoint folder holds `config.json` and its weights in safetensors files:
one `model.safetensors`, or shards listed by `model.safetensors.index.json`. m3's model is
a Llama with the same weight names (without the `model.` prefix) and the same "rotate half"
rotary embedding, so such weights load as they are, with no permutation:

```python
from m3.model.checkpoints import load_hf_checkpoint, save_hf_checkpoint

model = load_hf_checkpoint("checkpoints/llama-1b", memory_layers=range(8))
logits = model(idx)                              # the pretrained model, warmup mode
save_hf_checkpoint(model, "runs/continual/hf")   # and back, for Hugging Face tools
```

Four `model_type`s load: "llama" (SmolLM2 and TinyLlama too; Llama 3.x with its rotary
scaling), "mistral", "qwen2" (Qwen2, Qwen2.5: q/k/v biases) and "qwen3" (q/k norms).
Only what maps exactly is accepted; the translation of config.json, and what it refuses,
is `m3.model.hf_config` (its functions are importable from here too). The memory
settings are m3's own: they default to m3's (the first half of the layers read memories)
and can be set with keyword arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from m3.core.errors import UserError
from m3.model.config import Config
from m3.model.hf_config import (
    ARCHITECTURE_FIELDS,
    CONFIG_NAME,
    FREE_FIELDS,
    INDEX_NAME,
    SUPPORTED_MODEL_TYPES,
    WEIGHTS_NAME,
    config_from_hf,
    config_to_hf,
    read_hf_config,
)
from m3.model.memory3 import Memory3, RotaryEmbedding

__all__ = [
    "ARCHITECTURE_FIELDS", "CONFIG_NAME", "FREE_FIELDS", "INDEX_NAME", "SUPPORTED_MODEL_TYPES",
    "WEIGHTS_NAME", "config_from_hf", "config_to_hf", "load_hf_checkpoint", "load_hf_state_dict",
    "load_hf_weights", "load_weights", "read_hf_config", "save_hf_checkpoint",
]  # fmt: skip

# Tensors some conversions store although they follow from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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
            problems.append(
                f"bias {name} {shape}: m3's layers are bias-free here (the config sets no "
                "attention_bias or qkv_bias)"
            )
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
    """Write a model as a Hugging Face checkpoint: `config.json` + `model.safetensors`.

    A Llama, a Qwen2 (q/k/v biases) or a Qwen3 (q/k norms), as `config_to_hf` says:
    transformers' class of that family (`AutoModelForCausalLM.from_pretrained(directory)`)
    computes the same logits as the model in warmup mode; `load_hf_checkpoint(directory)`
    gives back the same model, memory settings included, bit for bit. With tied embeddings
    `lm_head.weight` is not stored (the Hugging Face convention).

    Args:
        model: The model.
        directory: The folder to write into (created when missing); its `config.json`
            and `model.safetensors` are overwritten.
        dtype: Dtype to store the weights in; the model's when None.

    Returns:
        The folder.

    Raises:
        UserError: For a model these families cannot express (LayerNorm), or a folder that
            already holds a sharded checkpoint.
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
