"""The parts m3 uses when a recipe names none are defined once, in `m3.recipes.defaults`.

The knowledge base especially: the continual stage pairs training chunks with references by
id, and a bank stores the references under the same ids, so both must cut the knowledge
base alike; with the recipe's chunker unset they use the same default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_WORLD

from m3.core import registry
from m3.core.errors import UserError
from m3.core.registry import ComponentSpec
from m3.data.chunking import FixedChunker
from m3.model.config import Config
from m3.recipes import (
    RECIPES_DIR,
    RecipeError,
    build,
    build_tokenizer,
    default_spec,
    defaults,
    load_recipe,
)

TINY = RECIPES_DIR / "tiny"
WORLD = ", ".join(f"{key}: {value}" for key, value in TINY_WORLD.items())


def test_default_specs_follow_the_model() -> None:
    config = Config.from_name("tiny", reference_length=32, memory_tokens=4)
    assert default_spec("chunker", config) == ComponentSpec("fixed", {"max_tokens": 32})
    assert default_spec("sparsifier", config) == ComponentSpec("top_k", {"k": 4})
    assert default_spec("encoder") == ComponentSpec("memory", {})
    assert default_spec("embedder") == ComponentSpec("hashed_ngram", {})
    assert default_spec("index") == ComponentSpec("exact", {})
    assert default_spec("index", references=defaults.SCANN_ABOVE) == ComponentSpec("exact", {})
    assert default_spec("index", references=defaults.SCANN_ABOVE + 1) == ComponentSpec("scann", {})
    with pytest.raises(UserError, match="follows the model"):
        default_spec("chunker")
    with pytest.raises(UserError, match="no default tokenizer"):
        default_spec("tokenizer", config)
    # every default names a class of its kind by short name
    for kind in defaults.KINDS:
        assert registry.resolve(kind, default_spec(kind, config).class_path)


def test_build_gives_the_recipes_part_or_the_default() -> None:
    recipe = load_recipe(TINY / "base.yaml", ["chunker=null", "model.reference_length=32"])
    chunker = build(recipe, "chunker")
    assert isinstance(chunker, FixedChunker) and chunker.max_tokens == 32
    named = load_recipe(TINY / "base.yaml", ["chunker.init_args.max_tokens=16"])
    assert build(named, "chunker").max_tokens == 16
    assert build(recipe, "sparsifier").k == recipe.model.config().memory_tokens
    assert type(build(recipe, "encoder")).__name__ == "MemoryEncoder"
    embedder = build(recipe, "embedder")
    assert embedder.fingerprint() == registry.instantiate("embedder", "hashed_ngram").fingerprint()
    index = build(recipe, "index", dim=8, references=10)
    assert type(index).__name__ == "ExactIndex" and index.dim == 8
    with pytest.raises(RecipeError, match="no tokenizer"):
        build(load_recipe(RECIPES_DIR / "paper-2.4b" / "base.yaml"), "tokenizer")
    with pytest.raises(RecipeError, match="not a component section"):
        build(recipe, "widget")


def _bank_references(tmp_path: Path, chunker: list[str]) -> list[list[int]]:
    """The references a bank built by `build_memory` from the tiny world stores, by id."""
    from m3.bank.build import build_memory
    from m3.bank.open import open_bank
    from m3.model.memory3 import Memory3

    recipe = load_recipe(
        [TINY / "base.yaml", TINY / "build-memory.yaml"],
        [
            *chunker, "model.n_layer=2", "model.reference_length=32",
            "trainer.enable_progress_bar=false", f"output={tmp_path / 'bank'}",
            f"training.init_weights={tmp_path / 'model.pt'}",
            f"data.knowledge=[{{class_path: world, init_args: {{split: kb, {WORLD}}}}}]",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    torch.save(Memory3(recipe.model.config()).state_dict(), tmp_path / "model.pt")
    bank = open_bank(build_memory(recipe))
    try:
        return [list(r.ids) for r in bank.store.references(range(len(bank.store)))]
    finally:
        bank.store.close()


def test_continual_pairing_and_the_bank_cut_the_knowledge_base_alike(tmp_path: Path) -> None:
    from m3.training.fit import data_module

    stored = _bank_references(tmp_path, ["chunker=null"])
    recipe = load_recipe(
        [TINY / "base.yaml", TINY / "continual.yaml"],
        [
            "chunker=null", "model.n_layer=2", "model.reference_length=32",
            f"data.train=[{{class_path: world, init_args: {{split: train, {WORLD}}}}}]",
            f"data.knowledge=[{{class_path: world, init_args: {{split: kb, {WORLD}}}}}]",
            "training.init_weights=random",
        ],
    )  # fmt: skip
    assert recipe.chunker is None  # both sides use m3's default
    data = data_module(recipe, build_tokenizer(recipe), pairing_file=tmp_path / "pairing.pt")
    data.setup()
    paired = [list(r.ids) for r in data.references]
    assert paired == stored  # the same references, under the same ids
    assert max(len(ids) for ids in paired) <= 32  # cut at the model's reference_length
    pairing = data.train_set.pairing
    assert ((pairing >= -1) & (pairing < len(stored))).all() and (pairing >= 0).any()
    # the test can fail: the datamodule's old default (128 tokens) cut other references
    from m3.bank.knowledge import read_knowledge

    old = read_knowledge(data.knowledge, data.tokenizer, chunker=FixedChunker(128)).references
    assert [list(r.ids) for r in old] != stored


def test_a_data_module_with_knowledge_needs_the_banks_chunker() -> None:
    from m3.data.sources import WorldSource
    from m3.data.tokenizer import ByteTokenizer
    from m3.training.datamodule import TextDataModule

    with pytest.raises(UserError, match=r"knowledge needs the chunker.*build\(recipe, 'chunker'\)"):
        TextDataModule(
            ByteTokenizer(), [WorldSource("train", **TINY_WORLD)],
            knowledge=[WorldSource("kb", **TINY_WORLD)],
        )  # fmt: skip
