"""`m3 smoke`: the README's first command until the quickstart lands."""

from __future__ import annotations

from m3.cli import main


def test_smoke_command_runs_and_checks_cached_decoding(capsys):
    assert main(["smoke", "--preset", "tiny", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "cached decoding" in out


def test_smoke_with_an_unknown_preset_is_a_user_error(capsys):
    assert main(["smoke", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'huge'" in err and "Traceback" not in err
