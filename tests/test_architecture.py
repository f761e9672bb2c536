"""The layering of m3's subpackages is a contract (docs: Architecture), checked here.

Every import statement in `m3/` counts, at module level or inside a function, but not those
under `if TYPE_CHECKING:` (annotations only). Lazy exports and old-path aliases name modules
in strings and are not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "m3"

_BELOW_RETRIEVAL = {"core", "model", "data", "recipes", "memory", "backends"}

#: subpackage -> the subpackages it may import, besides itself (the layer diagram)
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "model": {"core"},
    "data": {"core"},
    "recipes": {"core", "model"},
    "memory": {"core", "model"},
    "backends": {"core", "model", "memory"},
    "retrieval": _BELOW_RETRIEVAL,
    "bank": _BELOW_RETRIEVAL | {"retrieval"},
    "training": _BELOW_RETRIEVAL | {"retrieval", "bank"},
    "inference": _BELOW_RETRIEVAL | {"retrieval", "bank"},
}
#: the modules on top (command line, pipelines, reports) may import anything
TOP = {"__init__", "__main__", "cli", "pipeline", "report", "sizing", "smoke"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports() -> list[tuple[str, str, list[str], int]]:
    """(importing module, imported module, names imported from it, line) for all of m3."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                found += [(module, a.name, [], node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                found.append((module, target, [a.name for a in node.names], node.lineno))
    return [item for item in found if item[1] == "m3" or item[1].startswith("m3.")]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in TOP):
        return None  # the top: unrestricted
    return parts[1]


def test_every_subpackage_has_a_place_in_the_layers():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert packages == set(MAY_IMPORT), "add the subpackage to MAY_IMPORT and the docs' diagram"
    assert modules <= TOP, f"top-level modules outside the top layer: {sorted(modules - TOP)}"


def test_no_layer_imports_a_higher_one():
    wrong = []
    for module, target, _, line in imports():
        layer = _layer(module)
        if layer is None:
            continue
        target_layer = target.split(".")[1] if "." in target else None
        if target_layer is None:  # `import m3` / `from m3 import x` reaches the top
            wrong.append(f"{module}:{line} imports the top-level package m3")
        elif (
            target_layer != layer
            and target_layer not in MAY_IMPORT[layer]
            and target_layer not in TOP
        ):
            wrong.append(
                f"{module}:{line} imports {target} ({layer} may not import {target_layer})"
            )
        elif target_layer in TOP:
            wrong.append(f"{module}:{line} imports {target}, a top-level module")
    assert not wrong, "\n".join(wrong)


def test_the_layers_have_no_cycles():
    # MAY_IMPORT itself must be acyclic, so no two subpackages can import each other
    done: set[str] = set()

    def visit(layer: str, path: tuple[str, ...]) -> None:
        assert layer not in path, f"cycle in MAY_IMPORT: {' -> '.join((*path, layer))}"
        if layer not in done:
            for lower in MAY_IMPORT[layer]:
                visit(lower, (*path, layer))
            done.add(layer)

    for layer in MAY_IMPORT:
        visit(layer, ())


def test_no_module_import_cycles_at_import_time():
    # module-level imports only: a cycle there fails depending on what is imported first
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for node in tree.body:
            if node.lineno in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            graph.setdefault(module, set()).update(
                n for n in names if n and n.startswith("m3.") and n != module
            )
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_another_modules_private_names():
    wrong = [
        f"{module}:{line} imports {name} from {target}"
        for module, target, names, line in imports()
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_modules_stay_small(path):
    # one concept per module; the model file reads top to bottom and may be longer
    limit = 1000 if path == PACKAGE / "model" / "memory3.py" else 640  # about 600
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= limit, f"{path.relative_to(ROOT)} has {lines} lines (at most {limit})"


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for package in MAY_IMPORT:
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc, f"m3.{package} has no module docstring"
        assert "May import:" in doc, f"m3.{package}'s docstring does not say what it may import"
        for lower in MAY_IMPORT[package]:
            assert f"m3.{lower}" in doc, f"m3.{package}'s docstring omits m3.{lower}"
