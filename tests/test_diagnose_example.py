"""The diagnostics guide's example runs on a real bank (built by `m3 build-memory`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from m3.bank import build_memory
from m3.model import Memory3
from m3.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_diagnose_prints_shares_and_kept_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = load_recipe(
        [ROOT / "recipes/tiny/base.yaml", ROOT / "recipes/tiny/build-memory.yaml"],
        [
            "model.n_layer=2", "trainer.enable_progress_bar=false", f"output={tmp_path / 'bank'}",
            f"training.init_weights={tmp_path / 'm.pt'}",
            "data.knowledge=[{class_path: world, init_args: "
            "{split: kb, n_people: 12, n_places: 6, n_orgs: 6}}]",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    torch.save(Memory3(recipe.model.config()).state_dict(), tmp_path / "m.pt")
    bank = build_memory(recipe)
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    from diagnose import diagnose

    shares = diagnose(str(bank), "The town of Tarsville was founded in")
    config = recipe.model.config()
    assert shares.shape[:3] == (len(config.memory_layers), 1, config.n_head)
    assert ((shares >= 0) & (shares <= 1)).all() and shares.max() > 0
    out = capsys.readouterr().out
    assert "attention share on memory" in out
    assert out.count(" kept: ") == len(config.memory_layers)
    sys.modules.pop("diagnose", None)
