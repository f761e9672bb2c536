"""m3 0.1's module paths keep importing for one release, with a warning that names the new one.

`m3.Memory3`, `m3.Config` and the other top-level names work without a warning. Each check
runs in a fresh interpreter: a module imported once is cached, and warns only the first time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from m3.core.lazy import MOVED_MODULES

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> dict:
    """Run code in a fresh interpreter that records warnings; it prints JSON."""
    script = textwrap.dedent(
        """
        import json, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
        {body}
        print(json.dumps({{"out": out, "warnings": [
            [w.category.__name__, str(w.message), w.filename] for w in caught]}}))
        """
    ).format(body=textwrap.indent(textwrap.dedent(code), "    "))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_top_level_names_need_no_warning():
    result = run(
        """
        import m3
        out = [m3.Memory3.__name__, m3.Config.__name__, m3.KVCache.__name__,
               m3.Memories.__name__, m3.UserError.__name__, m3.__version__]
        """
    )
    assert result["out"][:5] == ["Memory3", "Config", "KVCache", "Memories", "UserError"]
    assert result["warnings"] == []


#: Names that m3 0.1's modules `m3.data`, `m3.memory` and `m3.bank` held, now elsewhere.
LEFT_A_PACKAGE = {
    "from m3.data import TextDataModule": "m3.training.datamodule.TextDataModule",
    "from m3.memory import SparseMemory": "m3.core.memories.SparseMemory",
    "from m3.bank import ShardedStore": "m3.backends.sharded.ShardedStore",
    "from m3.bank import ColdStartStore": "m3.backends.cold_start.ColdStartStore",
}


@pytest.fixture(scope="module")
def old_imports() -> dict:
    """Each old path imported once, in one fresh interpreter: statement -> [same, warnings]."""
    statements = [(f"import {old} as module", new) for old, new in sorted(MOVED_MODULES.items())]
    statements += [(s, new) for s, new in LEFT_A_PACKAGE.items()]
    return run(
        f"""
        import importlib, sys, warnings
        out = {{}}
        for statement, new in {statements!r}:
            with warnings.catch_warnings(record=True) as each:
                warnings.simplefilter("always")
                exec(statement, scope := {{}})
            found = scope.get("module", scope.get(statement.split()[-1]))
            module, _, name = new.rpartition(".")
            same = found is (importlib.import_module(new) if "module" in scope
                             else getattr(importlib.import_module(module), name))
            out[statement] = [same, [[w.category.__name__, str(w.message), w.filename]
                                     for w in each]]
        """
    )["out"]


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_an_old_module_path_imports_the_new_module_with_a_warning(old, new, old_imports):
    same, caught = old_imports[f"import {old} as module"]
    assert same, f"{old} is not {new}"
    deprecations = [w for w in caught if w[0] == "DeprecationWarning"]
    assert len(deprecations) == 1, caught
    assert f"{old} moved to {new}" in deprecations[0][1]
    assert deprecations[0][2] == "<string>"  # the warning points at the importing code


@pytest.mark.parametrize(("statement", "new"), sorted(LEFT_A_PACKAGE.items()))
def test_names_that_left_a_package_warn(statement, new, old_imports):
    same, caught = old_imports[statement]
    assert same, f"{statement} did not give {new}"
    messages = [w[1] for w in caught if w[0] == "DeprecationWarning"]
    assert any(f"moved to {new}" in m for m in messages), caught


def test_from_imports_of_old_paths_give_the_same_objects():
    result = run(
        """
        from m3.tokenizer import HFTokenizer
        from m3.data.tokenizer import HFTokenizer as new
        from m3.bank import build_memory, open_bank
        from m3.generate import load_inference
        from m3.inference.loading import load_inference as new_load
        out = [HFTokenizer is new, load_inference is new_load, callable(build_memory)]
        """
    )
    assert result["out"] == [True, True, True]


def test_recipes_name_components_by_short_name_without_a_warning():
    result = run(
        """
        from m3.recipes import load_recipe
        recipe = load_recipe(["recipes/tiny/base.yaml", "recipes/tiny/warmup.yaml"])
        out = [recipe.tokenizer.class_path]
        """
    )
    assert result["out"] == ["byte"]
    assert [w for w in result["warnings"] if w[0] == "DeprecationWarning"] == []
