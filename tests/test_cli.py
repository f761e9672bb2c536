"""The `m3` command: check, recipes, components; clean user errors; light imports."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from m3.cli import build_parser, main, split_recipe_arguments
from m3.data.chunking import FixedChunker
from m3.recipes import RECIPES_DIR, load_recipe, shipped_recipes

ROOT = RECIPES_DIR.parent
TINY = str(RECIPES_DIR / "tiny" / "base.yaml")


def run_module(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m m3 ARGS` (or `python -c CODE`) from the repository root."""
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "m3", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def table(out: str) -> dict[str, list[str]]:
    """Rows of `m3 components`: short name -> [dotted path, docstring line]."""
    rows = [line.split(None, 2) for line in out.splitlines() if line.startswith("  ")]
    return {row[0]: row[1:] for row in rows}


def verbs() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


# --- m3 check ---------------------------------------------------------------------------------


def test_check_prints_the_resolved_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", TINY, "model.n_layer=6"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed["model"] == {"preset": "tiny", "n_layer": 6}
    assert printed["chunker"] == {"class_path": "fixed", "init_args": {"max_tokens": 128}}
    assert printed == load_recipe(TINY, ["model.n_layer=6"]).to_dict()
    assert err.startswith(f"m3: ok: {TINY}: model tiny (")
    assert "tokenizer byte, chunker fixed" in err


def test_check_quiet_prints_only_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-q", TINY]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "m3: ok:" in err


def test_check_lists_every_problem_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", TINY, "model.n_layr=3", "seed=-1", "tokenizer=bites"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"m3: error: 3 problems in {TINY} and 3 overrides:\n")
    assert "  model.n_layr: unknown key; did you mean 'n_layer'?" in err
    assert "  seed: must be at least 0, got -1" in err
    assert "  tokenizer.class_path: unknown tokenizer 'bites'" in err
    assert "Traceback" not in err


def test_check_without_a_recipe_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["check"])
    assert exited.value.code == 2
    assert "RECIPE" in capsys.readouterr().err
    assert main(["check", "seed=1"]) == 2
    assert "name at least one recipe file" in capsys.readouterr().err


def test_recipe_arguments_split_on_equals_unless_a_file(tmp_path: Path) -> None:
    odd = tmp_path / "a=b.yaml"
    odd.write_text("model: {preset: tiny}\n")
    items = [TINY, "seed=3", str(odd), "model.n_layer=2"]
    assert split_recipe_arguments(items) == ([TINY, str(odd)], ["seed=3", "model.n_layer=2"])


# --- m3 recipes -------------------------------------------------------------------------------


def test_recipes_lists_each_with_description_and_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    shipped = shipped_recipes()
    assert shipped
    for recipe in shipped:
        assert recipe.path.relative_to(ROOT).as_posix() in out
        assert f"    {recipe.description}\n" in out
        assert f"    $ {recipe.command}\n" in out


# --- m3 components ----------------------------------------------------------------------------


def test_components_lists_built_ins_by_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: subclasses of m3.data.tokenizer.Tokenizer" in out
    assert "chunker: subclasses of m3.data.chunking.Chunker" in out
    rows = table(out)
    assert rows["byte"][0] == "m3.data.tokenizer.ByteTokenizer"
    assert rows["hf"][0] == "m3.data.tokenizer.HFTokenizer"
    assert rows["fixed"] == ["m3.data.chunking.FixedChunker", FixedChunker.__doc__.splitlines()[0]]
    assert rows["boundary"][0] == "m3.data.chunking.BoundaryChunker"


def test_components_of_one_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["components", "chunker"]) == 0
    out = capsys.readouterr().out
    assert "fixed" in out and "tokenizer:" not in out and "byte" not in out
    with pytest.raises(SystemExit):
        main(["components", "widget"])
    assert "invalid choice: 'widget'" in capsys.readouterr().err


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"lab_parts_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            '''
            from m3.data.chunking import FixedChunker


            class StrideChunker(FixedChunker):
                """Fixed spans, made in the lab."""
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_components_lists_a_users_class_once_named_in_a_recipe(
    user_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["components", "chunker"]) == 0
    assert "StrideChunker" not in capsys.readouterr().out
    assert main(["check", "-q", TINY, f"chunker.class_path={user_module}.StrideChunker"]) == 0
    assert main(["components", "chunker"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["stride"] == [f"{user_module}.StrideChunker", "Fixed spans, made in the lab."]


def test_components_import_option(user_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["components", "chunker", "--import", user_module]) == 0
    assert f"{user_module}.StrideChunker" in capsys.readouterr().out
    assert main(["components", "--import", "no_such_lab_module"]) == 2
    assert "no module named 'no_such_lab_module'" in capsys.readouterr().err


# --- every verb -------------------------------------------------------------------------------


def test_verbs_exist() -> None:
    assert {"check", "recipes", "components", "smoke"} <= set(verbs())


@pytest.mark.parametrize("verb", verbs())
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([verb, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: m3 {verb}")


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


# --- the real entry point, in a fresh interpreter ----------------------------------------------


def test_entry_point_reports_problems_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny, n_layer: abc}\nchunker: {class_path: fixed, x: 1}\n")
    result = run_module("check", str(bad), "seed=-1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.n_layer: expected int, got 'abc'" in result.stderr
    assert "chunker.x: unknown key" in result.stderr
    assert "seed: must be at least 0" in result.stderr


def test_help_and_check_do_not_import_lightning_or_torch() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from m3.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        after_help = sorted(m for m in ("lightning", "torch") if m in sys.modules)
        assert main(["check", "-q", {TINY!r}]) == 0
        after_check = sorted(m for m in ("lightning", "torch") if m in sys.modules)
        print("loaded:", after_help, after_check)
        """
    )
    result = run_module(code=code)
    assert result.returncode == 0, result.stderr
    assert "loaded: [] []" in result.stdout


# --- the guides show real output ---------------------------------------------------------------


def console_blocks() -> list[tuple[str, str, str]]:
    """(guide, command, expected output) of every ```console block in the CLI and recipe guides."""
    found = []
    for name in ("cli.md", "recipes.md"):
        text = (ROOT / "docs" / "guides" / name).read_text(encoding="utf-8")
        for block in text.split("```console\n")[1:]:
            command, _, output = block.split("\n```", 1)[0].partition("\n")
            found.append((name, command, output + "\n"))
    return found


@pytest.mark.parametrize(("guide", "command", "expected"), console_blocks())
def test_guide_console_blocks_match_the_real_output(
    guide: str, command: str, expected: str
) -> None:
    assert command.startswith("$ m3 ")
    result = run_module(*shlex.split(command)[2:])
    assert result.stdout + result.stderr == expected
