"""The overlays of `recipes/pretrained/`: each family's architecture, checked and run on stand-ins.

The real checkpoints are not here (nothing is downloaded); a small random checkpoint of each
family, written by transformers' own class with the family's features, stands in for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pretrained_families import REAL, SMALL, small_config, write_stand_in

from m3.cli import main
from m3.core.values import input_files_unchecked
from m3.model.hf_config import config_from_hf
from m3.recipes import RECIPES_DIR, load_recipe
from m3.sizing import dense_bytes, sparse_bytes

PAPER = [str(RECIPES_DIR / "paper-2.4b" / n) for n in ("base.yaml", "continual.yaml")]
ARCHITECTURE = ("vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "n_embd")
ARCHITECTURE += ("mlp_hidden", "norm_eps", "rope_base", "rope_scaling", "tie_embeddings")
ARCHITECTURE += ("attention_bias", "qkv_bias", "qk_norm", "activation", "norm")


def overlay(family: str) -> str:
    return str(RECIPES_DIR / "pretrained" / f"{family}.yaml")


def test_one_overlay_per_family() -> None:
    found = {p.stem for p in (RECIPES_DIR / "pretrained").glob("*.yaml")}
    assert found == set(REAL)


@pytest.mark.parametrize("family", sorted(REAL))
def test_overlay_is_the_familys_architecture(family: str) -> None:
    with input_files_unchecked():  # the paper's data and the checkpoint are not here
        config = load_recipe([*PAPER, overlay(family)]).model.config()
    real = config_from_hf(REAL[family])
    for name in ARCHITECTURE:
        assert getattr(config, name) == getattr(real, name), name
    assert config.memory_layers == tuple(range(config.n_layer // 2))  # the paper's first half
    assert (config.memory_tokens, config.reference_length, config.chunk_length) == (8, 128, 64)


def stand_in_overrides(family: str, folder: Path, data: Path) -> list[str]:
    """Point the overlay at the stand-in, at its sizes, and at tiny local data."""
    small = config_from_hf(small_config(family)).to_dict()
    init_args: dict[str, Any] = {"path": str(folder)}
    if family.startswith("qwen"):  # Qwen has no BOS: the overlay names its stand-in
        init_args["bos_token"] = "<|endoftext|>"
    tokenizer = {"class_path": "hf", "init_args": init_args}
    sizes = {name: small.get(name, False) for name in ARCHITECTURE}
    if sizes["rope_scaling"] is False:
        sizes["rope_scaling"] = None
    sizes["memory_layers"] = [0]
    sizes["block_size"] = 128
    sizes["reference_length"] = 32
    sizes["chunk_length"] = 32
    return [
        f"tokenizer={json.dumps(tokenizer)}",
        f"training.init_weights={folder}",
        *(f"model.{k}={json.dumps(v)}" for k, v in sizes.items()),
        f"data.train=[{{class_path: files, init_args: {{paths: [{data / 'train'}]}}}}]",
        f"data.knowledge=[{{class_path: files, init_args: {{paths: [{data / 'kb'}]}}}}]",
        "data.seq_length=128",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_fraction=0.2",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name, stem in (("train", "doc"), ("kb", "ref")):
        (root / name).mkdir()
        for i in range(6):
            text = f"Document {i}: the memory of reference {i} is kept sparse. " * 6
            (root / name / f"{stem}{i}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("family", sorted(REAL))
def test_overlay_checks_with_a_stand_in(family: str, tmp_path: Path, data: Path, capsys) -> None:
    folder = write_stand_in(family, tmp_path / family)
    overrides = stand_in_overrides(family, folder, data)
    recipe = load_recipe([*PAPER, overlay(family)], overrides)
    assert recipe.model.config().n_layer == SMALL["num_hidden_layers"]
    assert main(["check", "-q", *PAPER, overlay(family), *overrides]) == 0, capsys.readouterr().err


def test_a_continual_step_runs_from_a_stand_in(tmp_path: Path, data: Path, capsys) -> None:
    family = "qwen2.5-0.5b"
    folder = write_stand_in(family, tmp_path / family)
    run: list[Any] = [
        *stand_in_overrides(family, folder, data),
        f"output={tmp_path / 'run'}",
        "trainer.max_steps=1",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.precision=32",
        "trainer.accumulate_grad_batches=1",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=1",
        "training.warmup_steps=0",
    ]
    assert main(["fit", *PAPER, overlay(family), *run]) == 0, capsys.readouterr().err


def test_memory_per_reference_of_the_families() -> None:
    """The sizes quoted in docs/guides/pretrained.md (bf16, unquantized, per reference)."""
    sizes = {f: sparse_bytes(config_from_hf(REAL[f], block_size=2048)) for f in REAL}
    dense = {f: dense_bytes(config_from_hf(REAL[f], block_size=2048)) for f in REAL}
    for f in sorted(REAL):
        print(f, sizes[f], dense[f])
    assert sizes["qwen2.5-0.5b"] == 12 * 2 * 2 * 8 * 64 * 2
    assert sizes["llama-3.2-1b"] == 8 * 2 * 8 * 8 * 64 * 2
