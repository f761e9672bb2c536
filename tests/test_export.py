"""`m3 export`: a stage folder becomes a Hugging Face folder that transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from m3.cli import main
from m3.core.errors import UserError
from m3.data.tokenizer import HFTokenizer
from m3.model.checkpoints import load_hf_checkpoint
from m3.model.memory3 import Memory3
from m3.recipes import build_tokenizer, load_recipe

CORPUS = [
    "The cat sat on the mat. The dog sat on the log.\n",
    "Alice met Bob in Paris; Bob met Carol in Rome.\n",
    "Memories are written once and read many times.\n",
] * 20
TEXT = "The cat met Carol in Paris. Memories are read."


def make_run(
    root: Path,
    *overrides: str,
    tokenizer: str = "hf",
    finished: bool = True,
    init_args: dict | None = None,
) -> Path:
    """A finished stage folder by hand: recipe.yaml, a random model.pt, config.json, done.json.

    `init_args` names a tokenizer folder of the test's own (an `hf` tokenizer, vocab 512)."""
    lines = ["stage: warmup", f"output: {root / 'run'}", "model:", "  preset: tiny"]
    if init_args is not None:
        lines += ["  vocab_size: 512", "tokenizer:", "  class_path: hf"]
        lines += [f"  init_args: {json.dumps(init_args)}"]
    elif tokenizer == "hf":
        HFTokenizer.train(CORPUS, vocab_size=300).backend.save(str(root / "tokenizer.json"))
        lines += ["  vocab_size: 300", "tokenizer:", "  class_path: HFTokenizer"]
        lines += [f"  init_args: {{path: {root / 'tokenizer.json'}}}"]
    else:
        lines += ["tokenizer:", "  class_path: byte"]
    (root / "recipe.yaml").write_text("\n".join(lines) + "\n")
    recipe = load_recipe(root / "recipe.yaml", list(overrides))
    run = Path(recipe.output)
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    config = recipe.model.config()
    torch.manual_seed(0)
    model = Memory3(config)
    with torch.no_grad():  # norms away from 1 and non-zero biases, so that a mistake shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    torch.save(model.state_dict(), run / "model.pt")
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    if finished:
        (run / "done.json").write_text(json.dumps({"stage": "warmup"}))
    return run


@pytest.mark.parametrize(
    ("overrides", "model_type"),
    [((), "llama"), (("model.qk_norm=true",), "qwen3"), (("model.qkv_bias=true",), "qwen2")],
    ids=["llama", "qwen3", "qwen2"],
)
def test_export_loads_in_transformers_with_the_same_logits_and_ids(
    tmp_path: Path, overrides: tuple[str, ...], model_type: str, capsys
) -> None:
    run = make_run(tmp_path, "model.memory_layers=[1]", *overrides)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert f"({model_type})" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert not (tmp_path / "hf.partial").exists()

    recipe = load_recipe(run / "recipe.yaml")
    ours = build_tokenizer(recipe)
    theirs = AutoTokenizer.from_pretrained(out)
    ids = ours.encode(TEXT)
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert theirs.decode(ids) == TEXT
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id,
    )  # fmt: skip
    again = HFTokenizer(str(out))
    assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert again.encode(TEXT) == ids

    model = Memory3(recipe.model.config()).eval()
    model.load_state_dict(torch.load(run / "model.pt"))
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.model_type == model_type
    idx = torch.tensor([[ours.bos_id, *ids]])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)

    back = load_hf_checkpoint(out)
    assert back.config.memory_layers == (1,)
    assert back.config == model.config


def test_dtype_and_overwrite(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_byte_tokenizer_writes_no_tokenizer_file_and_says_so(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path, tokenizer="byte")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert "no Hugging Face tokenizer file" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def refused(capsys, *args: str) -> str:
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("m3: error:") == 1
    return err


def test_bad_inputs_exit_2_and_write_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert "no such folder" in refused(capsys, str(tmp_path / "nowhere"), str(out))
    (tmp_path / "empty").mkdir()
    assert "not a finished `m3 fit` stage" in refused(capsys, str(tmp_path / "empty"), str(out))
    (tmp_path / "a").mkdir()
    unfinished = make_run(tmp_path / "a", finished=False)
    assert "no done.json" in refused(capsys, str(unfinished), str(out))
    assert not out.exists() and not (tmp_path / "hf.partial").exists()

    (tmp_path / "b").mkdir()
    run = make_run(tmp_path / "b")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "is not empty" in refused(capsys, str(run), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    (tmp_path / "c").mkdir()
    layernorm = make_run(tmp_path / "c", "model.norm=layernorm")
    fresh = tmp_path / "fresh"
    assert "cannot be saved" in refused(capsys, str(layernorm), str(fresh))
    assert not fresh.exists() and not (tmp_path / "fresh.partial").exists()


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
#: a checkpoint's tokenizer: (special tokens after the vocabulary, the token its
#: post-processor adds, tokenizer_config.json, the recipe's init_args beyond the path)
SOURCES = {
    "qwen-no-bos": (
        QWEN_SPECIALS,
        None,
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        {"bos_token": "<|endoftext|>"},
    ),
    "llama3-no-pad": (
        LLAMA3_SPECIALS,
        "<|begin_of_text|>",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        {},
    ),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_the_exported_tokenizer_reads_back_as_the_source(tmp_path: Path, source: str) -> None:
    """HFTokenizer(path=) on the folder m3 export wrote, with no recipe arguments: the source
    tokenizer's BOS (also one the recipe chose), EOS and pad, its ids and its fingerprint."""
    from pretrained_families import bpe

    after, adds_bos, files, chosen = SOURCES[source]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    bpe(CORPUS, [], after, adds_bos).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(files))
    run = make_run(tmp_path, init_args={"path": str(folder), **chosen})
    ours = build_tokenizer(load_recipe(run / "recipe.yaml"))
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0

    again = HFTokenizer(str(out))  # no bos_token: the exported files name it
    assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert again.encode(TEXT) == ours.encode(TEXT)
    assert again.reference_prefix() == ours.reference_prefix()
    assert again.fingerprint() == ours.fingerprint()
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
    # the tokenizer file alone, without the tokenizer_config.json m3 export writes beside it
    (out / "tokenizer_config.json").unlink()
    if source == "qwen-no-bos":  # Qwen's vocabulary has no <s>: refused, naming the file
        with pytest.raises(UserError, match="has no bos_token '<s>'"):
            HFTokenizer(str(out))
    else:  # m3's own names do not fit Llama 3's either
        with pytest.raises(UserError, match="bos_token"):
            HFTokenizer(str(out))
