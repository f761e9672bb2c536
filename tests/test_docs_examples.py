"""The components of the guide "Writing your own component" build from their recipes and work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from m3.backends.base import StoreInfo
from m3.cli import main
from m3.core.registry import instantiate
from m3.memory.encoder import DenseMemory
from m3.recipes import RECIPES_DIR, build, load_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_the_store_builds_from_its_dotted_class_path(tmp_path: Path) -> None:
    from my_store import DirectoryStore

    spec = yaml.safe_load((EXAMPLES / "directory-store.yaml").read_text())["store"]
    assert spec["class_path"] == "my_store.DirectoryStore"
    spec["init_args"]["directory"] = str(tmp_path / "bank")
    info = StoreInfo(memory_shape=(2, 2, 2, 8, 16), dtype="bfloat16")
    store = instantiate("store", spec, info=info)  # creates it
    assert isinstance(store, DirectoryStore) and len(store) == 0
    assert instantiate("store", spec).info == info  # opens it


def test_the_store_is_listed_once_imported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["components", "store", "--import", "my_store"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["directory", "my_store.DirectoryStore"] in rows  # short name, dotted path


def test_the_sparsifier_builds_from_a_recipe_overlay() -> None:
    from my_sparsifier import FirstTokensSparsifier

    recipe = load_recipe([RECIPES_DIR / "tiny" / "base.yaml", EXAMPLES / "first-tokens.yaml"])
    sparsifier = build(recipe, "sparsifier")
    assert isinstance(sparsifier, FirstTokensSparsifier) and sparsifier.k == 8

    lengths = torch.tensor([128, 5])  # the second reference is shorter than k
    scores = torch.randn(2, 2, 2, 128)
    scores[1, ..., 5:] = float("-inf")
    keys = torch.randn(2, 2, 2, 128, 16)
    memory = sparsifier(DenseMemory(keys, keys.clone(), scores, lengths))
    assert memory.positions[0].eq(torch.arange(8)).all()
    assert torch.equal(memory.keys[0], keys[0, :, :, :8])
    assert memory.valid[1].tolist() == [True] * 5 + [False] * 3


def test_the_sparsifier_is_checked_like_a_built_in(capsys: pytest.CaptureFixture[str]) -> None:
    recipes = [str(RECIPES_DIR / "tiny" / "base.yaml"), str(EXAMPLES / "first-tokens.yaml")]
    assert main(["check", "-q", *recipes, "sparsifier.init_args.k=0"]) == 2
    assert "FirstTokensSparsifier rejected them: k must be a positive integer" in (
        capsys.readouterr().err
    )


def test_the_recipe_guides_chunker_is_checked_and_built(tmp_path: Path) -> None:
    from my_parts import GlossaryChunker

    from m3.recipes import RecipeError

    files = [RECIPES_DIR / "tiny" / "base.yaml", EXAMPLES / "glossary.yaml"]
    with pytest.raises(RecipeError) as raised:  # data/glossary.txt does not exist here
        load_recipe(files, ["chunker.init_args.max_tokens=4"])
    problems = "\n".join(str(p) for p in raised.value.problems)
    assert "chunker.init_args.glossary" in problems and "max_tokens" in problems
    glossary = tmp_path / "glossary.txt"
    glossary.write_text("explicit memory\n")
    recipe = load_recipe(files, [f"chunker.init_args.glossary={glossary}"])
    chunker = build(recipe, "chunker")
    assert isinstance(chunker, GlossaryChunker) and chunker.glossary == str(glossary)
