"""Recipe sections that are a component's constructor arguments, each option said once.

`training:` is `Memory3Module`'s arguments, `data:` `TextDataModule`'s, `trainer:`
Lightning's `Trainer`'s. Their keys, types, defaults and documentation are read from the
constructors' source (`m3.recipes.signatures`), never by importing them, so that checking a
recipe stays fast; what the source gives must agree with the imported classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pickle
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from m3.core.runs import recipe_fingerprint
from m3.core.values import type_name
from m3.recipes import (
    RECIPES_DIR,
    DataSection,
    RecipeError,
    TrainerSection,
    TrainingSection,
    build_tokenizer,
    load_recipe,
)
from m3.recipes.signatures import args_doc, signature

ROOT = RECIPES_DIR.parent
TINY = [RECIPES_DIR / "tiny" / "base.yaml", RECIPES_DIR / "tiny" / "warmup.yaml"]
SECTIONS = [TrainingSection, DataSection, TrainerSection]


def problems_of(overrides: list[str]) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(TINY, overrides)
    return {p.path: p.message for p in caught.value.problems}


@pytest.mark.parametrize(
    "target",
    [
        "m3.training.module:Memory3Module",
        "m3.training.datamodule:TextDataModule",
        "lightning.pytorch:Trainer",
    ],
)
def test_signatures_read_from_source_agree_with_the_imported_class(target: str) -> None:
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    real = list(inspect.signature(cls).parameters.values())
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    read = signature(target)
    assert [a.name for a in read.arguments] == [p.name for p in real]
    for argument, parameter in zip(read.arguments, real, strict=True):
        assert argument.kind == parameter.kind, argument.name
        assert argument.default == parameter.default, argument.name
        # the same checks: stand-ins are named like the classes they stand for
        expected = type_name(hints.get(parameter.name, typing.Any))
        assert type_name(read.hint(argument.name)) == expected, argument.name
    docs = {**args_doc(inspect.getdoc(cls) or ""), **args_doc(cls.__init__.__doc__ or "")}
    assert {a.name: a.doc for a in read.arguments} == {p.name: docs.get(p.name, "") for p in real}


def test_checking_a_training_recipe_imports_neither_torch_nor_lightning() -> None:
    code = textwrap.dedent(
        """
        import sys, time
        start = time.perf_counter()
        from m3.recipes import RecipeError, load_recipe
        files = ["recipes/tiny/base.yaml", "recipes/tiny/warmup.yaml"]
        recipe = load_recipe(files, ["training.lr=0.01", "trainer.max_epochs=2"])
        recipe.to_yaml()
        try:
            load_recipe(files, ["training.lr=-1", "data.seed=3", "trainer.precision=bf16-mix"])
        except RecipeError as error:
            found = len(error.problems)
        loaded = sorted(m for m in ("torch", "lightning") if m in sys.modules)
        print("loaded:", loaded, "problems:", found, "seconds:", time.perf_counter() - start)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: [] problems: 3 " in result.stdout


def test_each_option_is_documented_once_on_its_constructor() -> None:
    for section in (TrainingSection, DataSection):
        undocumented = [key for key in section.options() if not section.doc(key)]
        assert not undocumented, f"{section.component} does not document {undocumented}"
        # the section itself does not document its options again
        assert "Attributes:" not in (section.__doc__ or "")
    for key in TrainerSection.written:
        assert TrainerSection.doc(key), key  # Lightning's Args
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    guide = (ROOT / "docs" / "guides" / "recipes.md").read_text(encoding="utf-8")
    for name, section in (("training", TrainingSection), ("data", DataSection)):
        assert f"<!-- section-options {name} -->" in guide
        table = hooks.options_table(name)
        for key in section.options():
            assert f"| `{key}` |" in table and section.doc(key).split("`")[0] in table
    assert "<!-- section-options trainer -->" in guide
    rendered = hooks.on_page_markdown(guide, None, None, None)
    assert "<!-- section-options" not in rendered and "| `max_steps` | `1000` |" in rendered


def test_sections_write_out_what_recipes_always_wrote() -> None:
    # these keys, with these defaults, are in every recipe's fingerprint: a run folder
    # finished before is recognised only while they stay (tests/test_pre_house.py)
    assert TrainingSection.defaults() == {
        "lr": 8e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "schedule": "wsd",
        "warmup_steps": 100, "decay_fraction": 0.1, "min_lr_ratio": 0.0, "window": 5,
        "encode": "grad", "memories": None, "init_weights": None,
    }  # fmt: skip
    assert list(TrainingSection())[-2:] == ["memories", "init_weights"]  # as always written
    assert DataSection.defaults() == {
        "train": None, "val": None, "knowledge": None, "val_fraction": 0.05,
        "seq_length": 256, "batch_size": 8, "num_workers": 0, "threshold": 0.9,
        "candidates": 8, "pairing_file": None, "distractors": None, "previous_share": None,
    }  # fmt: skip
    # the two added last count in the fingerprint only when set
    written = load_recipe(TINY).to_dict()
    added = ("distractors", "previous_share")
    before = {k: v for k, v in written["data"].items() if k not in added}
    assert recipe_fingerprint(written) == recipe_fingerprint({**written, "data": before})
    assert list(TrainerSection.defaults()) == [
        "max_steps", "accelerator", "devices", "num_nodes", "strategy", "precision",
        "accumulate_grad_batches", "gradient_clip_val", "val_check_interval",
        "limit_val_batches", "log_every_n_steps", "enable_progress_bar", "deterministic",
    ]  # fmt: skip


def test_options_m3_sets_itself_are_refused_saying_where_from() -> None:
    problems = problems_of(["data.seed=3", "training.stage=continual", "trainer.callbacks=[]"])
    assert problems == {
        "data.seed": "is set by m3 itself (the recipe's seed); remove it from the recipe "
        "(from the command line)",
        "training.stage": "is set by m3 itself (the recipe's stage); remove it from the "
        "recipe (from the command line)",
        "trainer.callbacks": "is set by m3 itself (m3 checkpoints to checkpoints/ in the run "
        "folder); remove it from the recipe (from the command line)",
    }


def test_any_trainer_argument_counts_only_when_set() -> None:
    recipe = load_recipe(TINY, ["trainer.max_epochs=2", "trainer.num_sanity_val_steps=0"])
    kwargs = recipe.trainer.to_kwargs()
    assert kwargs["max_epochs"] == 2 and kwargs["num_sanity_val_steps"] == 0
    assert recipe.trainer.max_epochs == 2 and load_recipe(TINY).trainer.max_epochs is None
    assert "max_epochs" not in load_recipe(TINY).to_dict()["trainer"]
    before = recipe_fingerprint(load_recipe(TINY).to_dict())
    assert recipe_fingerprint(recipe.to_dict()) != before
    problems = problems_of(["trainer.precision=bf16-mix", "trainer.lr=1", "trainer.max_steps=0"])
    assert problems["trainer.precision"].startswith("expected one of 64, 32, 16 or one of")
    assert "max_epochs" in problems["trainer.lr"] and "callbacks" not in problems["trainer.lr"]
    assert problems["trainer.max_steps"] == "must be at least 1, got 0 (from the command line)"


def test_a_section_is_a_read_only_mapping_of_its_options() -> None:
    section = load_recipe(TINY).training
    assert section.lr == section["lr"] == 3e-3 and dict(section)["warmup_steps"] == 10
    assert "memories" in section and "memories" not in section.arguments()
    assert pickle.loads(pickle.dumps(section)) == section
    with pytest.raises(AttributeError, match="read-only"):
        section.lr = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError, match="no option 'lrr'"):
        _ = section.lrr
    with pytest.raises(TypeError, match="unknown options"):
        TrainingSection(lrr=1)
    assert TrainingSection(lr=1e-3)["lr"] == 1e-3 and TrainingSection()["lr"] == 8e-4


def test_fit_builds_the_module_and_the_data_from_the_sections(tmp_path: Path) -> None:
    from m3.training.fit import data_module, training_module

    recipe = load_recipe(
        TINY, ["training.betas=[0.8, 0.9]", "training.schedule=cosine", "data.threshold=0.5"]
    )
    tokenizer = build_tokenizer(recipe)
    module = training_module(recipe, tokenizer)
    for key, value in recipe.training.arguments().items():
        if key != "init_weights":
            assert module.hparams[key] == value, key
    assert module.hparams["stage"] == "warmup" and module.config == recipe.model.config()
    data = data_module(recipe, tokenizer, pairing_file=tmp_path / "pairing.pt")
    for key in ("val_fraction", "seq_length", "batch_size", "num_workers", "threshold"):
        assert getattr(data, key) == recipe.data[key], key
    assert data.seed == recipe.seed and data.pairing_file == tmp_path / "pairing.pt"
    assert data.knowledge is None and data.chunker.max_tokens == 128
    assert json.dumps(recipe.to_dict())  # plain values all through


def test_signatures_follow_aliases_and_fall_back_to_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    name = f"sig_parts_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}_types.py").write_text(
        "from typing import Literal\nimport torch_is_never_imported_here\n"
        "Mode = Literal['a', 'b']\nclass Thing:\n    pass\n"
    )
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f'''
            from __future__ import annotations
            from typing import Annotated
            from m3.core.values import Bounds
            from {name}_types import Mode, Thing

            class Base:
                """A base.

                Args:
                    mode: How.
                    size: How many.
                    thing: A thing.
                """

                def __init__(
                    self, mode: Mode = "a", *, size: Annotated[int, Bounds(ge=1)] = 2,
                    thing: "Thing | None" = None,
                ) -> None:
                    pass

            class Child(Base):
                """Inherits its constructor."""
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    read = signature(f"{name}:Base")
    assert [(a.name, a.default, a.doc) for a in read.arguments] == [
        ("mode", "a", "How."), ("size", 2, "How many."), ("thing", None, "A thing.")
    ]  # fmt: skip
    assert type_name(read.hint("mode")) == "one of 'a', 'b'"  # an alias in another module
    assert read.stand_in({"size": read.hint("size")})  # and Bounds is the real marker
    assert type_name(read.hint("thing")) == "Thing or null"
    assert f"{name}_types" not in sys.modules and f"{name}" not in sys.modules
    with pytest.raises(ModuleNotFoundError):  # no __init__ of its own: it is imported
        signature(f"{name}:Child")
