"""A trained stage as a Hugging Face checkpoint folder, tokenizer included (`m3 export`).

```python
from m3.inference.export import export_hf

export_hf("runs/tiny/continual", "runs/tiny/hf")
# then: AutoModelForCausalLM.from_pretrained("runs/tiny/hf"), AutoTokenizer.from_pretrained(...)
```

The folder holds `config.json` and `model.safetensors` (`m3.model.checkpoints.save_hf_checkpoint`:
a Llama, Qwen2 or Qwen3 that transformers computes like m3's model in warmup mode, with the
memory settings under the `m3` key of config.json, which `load_hf_checkpoint` reads back),
and, for a Hugging Face tokenizer (`HFTokenizer`), its `tokenizer.json` with a
`tokenizer_config.json` naming the BOS, EOS and pad tokens: transformers' `AutoTokenizer`
and m3's `HFTokenizer(path=folder)` both load it with the same ids. m3's byte tokenizer has
no Hugging Face file; `export_hf` says so in its notes.

The folder is written as `OUT.partial` and renamed at the end, so an interrupted export never
leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3.core.errors import UserError

__all__ = ["DTYPES", "RUN_FILES", "Export", "export_hf"]

#: The dtypes an export can store the weights in.
DTYPES = ("float32", "bfloat16", "float16")

#: The files of a finished `m3 fit` stage folder that an export reads (done.json: finished).
RUN_FILES = ("recipe.yaml", "model.pt", "config.json", "done.json")


@dataclass
class Export:
    """What `export_hf` wrote.

    Attributes:
        path: The Hugging Face folder.
        model_type: The family transformers loads it as (`llama`, `qwen2`, `qwen3`).
        files: The files written, by name.
        notes: What a user should know (e.g. that there is no tokenizer file).
    """

    path: Path
    model_type: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_run_folder(run: Path) -> None:
    if not run.is_dir():
        raise UserError(f"{run}: no such folder (expected the output folder of `m3 fit`)")
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    if missing:
        what = (
            "the stage has not finished (no done.json)"
            if missing == ["done.json"]
            else f"it lacks {', '.join(missing)}"
        )
        raise UserError(
            f"{run} is not a finished `m3 fit` stage folder: {what}; export a folder "
            f"holding {', '.join(RUN_FILES)}"
        )


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{out} is not empty; choose another output folder, or pass --overwrite to replace it"
        )


def _tokenizer_config(tokenizer: Any, block_size: int) -> dict[str, Any]:
    name = tokenizer.backend.id_to_token
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tokenizer.bos_id),
        "eos_token": name(tokenizer.eos_id),
        "pad_token": name(tokenizer.pad_id),  # the EOS token where m3 pads with the EOS id
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
    }


def _write_tokenizer(tokenizer: Any, folder: Path, block_size: int, result: Export) -> None:
    from m3.data.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        tokenizer.backend.save(str(folder / "tokenizer.json"))
        config = _tokenizer_config(tokenizer, block_size)
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        result.files += ["tokenizer.json", "tokenizer_config.json"]
        result.notes.append(
            "m3 encodes without adding special tokens and puts the BOS in front itself: "
            "with transformers, encode with add_special_tokens=False and prepend "
            f"bos_token {config['bos_token']!r}"
        )
    else:
        result.notes.append(
            f"no Hugging Face tokenizer file: the recipe's tokenizer ({type(tokenizer).__name__}) "
            "has none; encode text with m3's tokenizer (the byte tokenizer: UTF-8 bytes, "
            f"BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}, pad {tokenizer.pad_id})"
        )


def export_hf(
    run_folder: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Export:
    """Write a finished stage's model and tokenizer as a Hugging Face checkpoint folder.

    Args:
        run_folder: The output folder of `m3 fit` (recipe.yaml, model.pt, config.json,
            done.json).
        out: The folder to write; it must be missing or empty unless `overwrite`.
        dtype: `float32`, `bfloat16` or `float16`; the weights' own dtype when None.
        overwrite: Replace a non-empty `out`.

    Returns:
        What was written.

    Raises:
        UserError: For a folder that is not a finished stage, a non-empty `out` without
            `overwrite`, an unknown dtype, or a model the Hugging Face Llama, Qwen2 and Qwen3
            classes cannot express; nothing is written then.
    """
    import torch

    from m3.model.checkpoints import load_weights, save_hf_checkpoint
    from m3.model.hf_config import config_to_hf
    from m3.model.memory3 import Memory3
    from m3.recipes import build_tokenizer, load_recipe

    run, out = Path(run_folder), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    _check_run_folder(run)
    _check_out(out, overwrite)
    recipe = load_recipe(run / "recipe.yaml")
    config = recipe.model.config()
    torch_dtype = getattr(torch, dtype) if dtype else None
    hf_config = config_to_hf(config)  # refuses what these families cannot express
    tokenizer = build_tokenizer(recipe) if recipe.tokenizer is not None else None
    model = Memory3(config)
    load_weights(model, run / "model.pt")

    result = Export(path=out, model_type=hf_config["model_type"])
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        save_hf_checkpoint(model, partial, dtype=torch_dtype)
        result.files += ["config.json", "model.safetensors"]
        if tokenizer is None:
            result.notes.append("no tokenizer: the recipe names none")
        else:
            _write_tokenizer(tokenizer, partial, config.block_size, result)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return result
