"""The diagnostics guide's example runs on a real bank (built by `m3 build-memory`)."""

from __future__ import annotations

import pytest


def test_diagnose_prints_shares_and_kept_tokens(
    tiny_bank, docs_example, capsys: pytest.CaptureFixture[str]
) -> None:
    diagnose = docs_example("diagnose").diagnose

    shares = diagnose(str(tiny_bank.folder), "The town of Tarsville was founded in")
    config = tiny_bank.recipe.model.config()
    assert shares.shape[:3] == (len(config.memory_layers), 1, config.n_head)
    assert ((shares >= 0) & (shares <= 1)).all() and shares.max() > 0
    out = capsys.readouterr().out
    assert "attention share on memory" in out
    assert out.count(" kept: ") == len(config.memory_layers)
