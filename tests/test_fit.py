"""`m3 fit`: the tiny recipes train both stages through the real command, into tmp folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m3.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes/tiny/base.yaml")
WARMUP = str(ROOT / "recipes/tiny/warmup.yaml")
CONTINUAL = str(ROOT / "recipes/tiny/continual.yaml")
FAST = [
    "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "data.batch_size=2",
]  # fmt: skip


def run(*args: str) -> int:
    return main(["fit", *args])


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "warmup"
    assert run(BASE, WARMUP, f"output={out}", *FAST) == 0
    return out


def test_warmup_stage_writes_weights_curves_and_marks_itself_done(warmup_run, capsys):
    for name in ("model.pt", "config.json", "curves.png", "recipe.yaml", "logs/metrics.csv"):
        assert (warmup_run / name).is_file(), name
    done = json.loads((warmup_run / "done.json").read_text())
    assert done["stage"] == "warmup" and done["steps"] == 3
    assert torch.isfinite(torch.tensor(done["metrics"]["val/loss"]))
    # the same recipe again finds its outputs complete
    assert run(BASE, WARMUP, f"output={warmup_run}", *FAST) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_another_recipe_never_overwrites_a_run_folder(warmup_run, capsys):
    assert run(BASE, WARMUP, f"output={warmup_run}", *FAST, "training.lr=0.01") == 2
    err = capsys.readouterr().err
    assert "holds the outputs of another recipe" in err and "Traceback" not in err


def test_continual_stage_starts_from_the_warmup_weights(warmup_run, tmp_path):
    out = tmp_path / "continual"
    init = f"training.init_weights={warmup_run / 'model.pt'}"
    assert run(BASE, CONTINUAL, f"output={out}", init, *FAST) == 0
    done = json.loads((out / "done.json").read_text())
    assert done["stage"] == "continual" and (out / "pairing.pt").is_file()
    # the pairing read the knowledge base's references from the table written beside it
    assert (out / "pairing.references" / "manifest.json").is_file()
    before = torch.load(warmup_run / "model.pt")
    after = torch.load(out / "model.pt")
    assert not torch.equal(
        before["layers.0.self_attn.k_proj.weight"], after["layers.0.self_attn.k_proj.weight"]
    )


def test_continual_training_from_random_weights_must_be_asked_for(tmp_path):
    """`training.init_weights: random` trains with memory from step 0 (Figure 11's arm)."""
    out = tmp_path / "from-scratch"
    assert run(BASE, CONTINUAL, f"output={out}", "training.init_weights=random", *FAST) == 0
    done = json.loads((out / "done.json").read_text())
    assert done["stage"] == "continual" and done["steps"] == 3


def test_bad_continual_recipes_stop_before_any_work(warmup_run, tmp_path, capsys):
    out = tmp_path / "never"
    assert run(BASE, CONTINUAL, f"output={out}", "training.init_weights=null", *FAST) == 2
    assert "training.init_weights: the continual stage starts from" in capsys.readouterr().err
    assert run(BASE, CONTINUAL, f"output={out}", f"training.init_weights={tmp_path}/none.pt") == 2
    assert "does not exist" in capsys.readouterr().err
    init = f"training.init_weights={warmup_run / 'model.pt'}"
    assert run(BASE, CONTINUAL, f"output={out}", init, "model.n_embd=32", *FAST) == 2
    assert "weight embed_tokens.weight has shape" in capsys.readouterr().err
    assert run(BASE, WARMUP, f"output={out}", "model.vocab_size=100", *FAST) == 2
    assert "the tokenizer has 259 ids" in capsys.readouterr().err
    assert not (out / "done.json").exists()


# ------------------------------------------------------------- encode: store (the frozen option)
BUILD = str(ROOT / "recipes/tiny/build-memory.yaml")


@pytest.fixture(scope="module")
def warmup_bank(warmup_run, tmp_path_factory) -> Path:
    """The continual recipe's knowledge base, encoded by the warmup weights."""
    out = tmp_path_factory.mktemp("banks") / "warmup-bank"
    init = f"training.init_weights={warmup_run / 'model.pt'}"
    args = [BASE, BUILD, f"output={out}", init, "trainer.enable_progress_bar=false"]
    assert main(["build-memory", *args]) == 0
    return out


def test_continual_stage_reads_frozen_memories_from_a_bank(warmup_run, warmup_bank, tmp_path):
    out = tmp_path / "frozen"
    init = f"training.init_weights={warmup_run / 'model.pt'}"
    store = ["training.encode=store", f"training.memories={warmup_bank}"]
    assert run(BASE, CONTINUAL, f"output={out}", init, *store, *FAST, "data.num_workers=1") == 0
    done = json.loads((out / "done.json").read_text())
    assert done["stage"] == "continual" and done["steps"] == 3
    before = torch.load(warmup_run / "model.pt")
    after = torch.load(out / "model.pt")
    name = "layers.0.self_attn.k_proj.weight"
    assert not torch.equal(before[name], after[name])


def test_bad_store_settings_stop_before_any_work(warmup_run, warmup_bank, tmp_path, capsys):
    out = tmp_path / "never"
    init = f"training.init_weights={warmup_run / 'model.pt'}"
    common = [BASE, CONTINUAL, f"output={out}", *FAST]

    def refused(*args: str) -> str:
        assert run(*common, *args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    err = refused(init, "training.encode=store")
    assert "training.memories: training.encode: store reads" in err
    err = refused(init, "training.encode=store", f"training.memories={warmup_run}")
    assert f"training.memories: {warmup_run} holds no finished memory bank" in err
    small = "data.knowledge=[{class_path: world, init_args: {split: kb, n_people: 12}}]"
    err = refused(init, "training.encode=store", f"training.memories={warmup_bank}", small)
    assert "references" in err and "data.knowledge cut by this recipe's chunker gives" in err
    err = refused(init, "training.encode=store", f"training.memories={warmup_bank}",
                  "model.memory_tokens=4")  # fmt: skip
    assert "the model's kept tokens (k) is 4, the store holds 8" in err
    err = refused("training.init_weights=random", "training.encode=store",
                  f"training.memories={warmup_bank}")  # fmt: skip
    assert f"training.memories: {warmup_bank} was written by weights" in err
    err = refused(init, f"training.memories={warmup_bank}")
    assert "training.memories: only a continual stage with training.encode: store" in err
    assert not out.exists() or not (out / "done.json").exists()
