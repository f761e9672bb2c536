"""Shared fixtures and options.

`--device` and `--dtype` run the model equivalence tests elsewhere than fp32 on the CPU, e.g.
`python -m pytest tests/test_model.py --device cuda --dtype bfloat16` on a GPU machine
(`scripts/check_cuda.sh`). CI never needs a GPU: the defaults are `cpu` and `float32`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for model tests (default: cpu)")
    parser.addoption(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16", "float16"],
        help="dtype of the model under test (default: float32)",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


# ------------------------------------------------------------------- a bank for the docs' examples
@dataclass(frozen=True)
class TinyBank:
    """A memory bank of a small synthetic world, written by random tiny weights.

    Attributes:
        folder: The bank folder (`m3 build-memory`'s output; treat it as read-only).
        data: The world's files (`World.write`): `kb.jsonl`, `heldout.jsonl`, `cloze.jsonl`…
        weights: The weights that wrote the bank (`model.pt`).
        recipe: The bank's recipe.
        world: The world whose knowledge base the bank holds.
    """

    folder: Path
    data: Path
    weights: Path
    recipe: Any
    world: Any


#: the world of `tiny_bank`: a few dozen entities, about 150 references
TINY_WORLD = {"n_people": 12, "n_places": 6, "n_orgs": 6}


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory: pytest.TempPathFactory) -> TinyBank:
    """A bank built by `build_memory` from the tiny recipes, small enough for seconds of CPU.

    Two layers, 32-token references and a 512-token context, so that RAG prompts of 5
    references fit; the world's files are written next to it. Tests that change a bank copy
    `folder` first.
    """
    from m3.bank.build import build_memory
    from m3.data.world import World
    from m3.model.memory3 import Memory3
    from m3.recipes import RECIPES_DIR, load_recipe

    root = tmp_path_factory.mktemp("tiny_bank")
    sizes = ", ".join(f"{key}: {value}" for key, value in TINY_WORLD.items())
    recipe = load_recipe(
        [RECIPES_DIR / "tiny" / "base.yaml", RECIPES_DIR / "tiny" / "build-memory.yaml"],
        [
            "model.n_layer=2", "model.reference_length=32", "model.block_size=512",
            "trainer.enable_progress_bar=false", f"output={root / 'bank'}",
            f"training.init_weights={root / 'model.pt'}",
            f"data.knowledge=[{{class_path: world, init_args: {{split: kb, {sizes}}}}}]",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    torch.save(Memory3(recipe.model.config()).state_dict(), root / "model.pt")
    folder = build_memory(recipe)
    world = World.generate(0, **TINY_WORLD)
    world.write(root / "data")
    return TinyBank(folder, root / "data", root / "model.pt", recipe, world)


@pytest.fixture(scope="session")
def docs_example() -> Callable[[str], ModuleType]:
    """Import a script of `docs/examples` by name, without running its `__main__` block."""

    def load(name: str) -> ModuleType:
        path = EXAMPLES / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"docs_examples_{name}", path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
