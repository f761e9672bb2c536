"""mkdocs hook: tables generated from the code at build time, so that they cannot drift.

- `<!-- shipped-recipes -->` (docs/recipes.md): one row per file in `recipes/`, composed as
  its opening command composes it (stage, model, components);
- `<!-- recipe-sections -->` (docs/guides/recipes.md): the top-level keys of a recipe, from
  the attributes of `m3.recipes.Recipe` and its type hints.

`tests/test_docs.py` checks both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- shipped-recipes -->"
SECTIONS_MARKER = "<!-- recipe-sections -->"


def _components(section: Any, prefix: str = "") -> list[str]:
    """`name class_path` of every component a recipe section names, in field order."""
    found = []
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if "kind" in field.metadata and value is not None:
            specs = value if isinstance(value, (list, tuple)) else [value]
            names = ", ".join(f"`{spec.class_path}`" for spec in specs)
            found.append(f"{prefix}{field.name} {names}")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            found += _components(value, prefix=f"{prefix}{field.name}.")
    return found


def _import_m3() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def sections_table() -> str:
    """The Markdown table of a recipe's top-level keys, from `m3.recipes.Recipe`."""
    _import_m3()
    from m3.recipes import Recipe

    described: dict[str, str] = {}
    name = None
    for line in inspect.getdoc(Recipe).split("Attributes:", 1)[1].splitlines():
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            name, described[entry[1]] = entry[1], entry[2]
        elif name and line.startswith("        "):
            described[name] += " " + line.strip()
    hints = typing.get_type_hints(Recipe, include_extras=True)
    rows = ["| key | what it holds |", "|---|---|"]
    for field in dataclasses.fields(Recipe):
        text = described.get(field.name, "")
        literal = [a for a in typing.get_args(hints[field.name]) if typing.get_origin(a)]
        choices = [typing.get_args(a) for a in literal if typing.get_origin(a) is typing.Literal]
        if typing.get_origin(hints[field.name]) is typing.Literal:
            choices.append(typing.get_args(hints[field.name]))
        for values in choices:
            text += " One of " + ", ".join(f"`{v}`" for v in values) + "."
        rows.append(f"| `{field.name}` | {text} |")
    return "\n".join(rows)


def _recipe_items(command: str) -> list[str]:
    """The `RECIPE… KEY=VALUE…` arguments of a recipe's command, without its options."""
    from m3.cli import build_parser

    argv = shlex.split(command)[1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its errors
            return build_parser().parse_args(argv).recipe_items
    except (SystemExit, AttributeError):  # a verb this checkout does not have yet
        return [item for item in argv[1:] if not item.startswith("-")]


def recipes_table() -> str:
    """The Markdown table of the shipped recipes: file, stage, model, components, command."""
    _import_m3()
    from m3.cli import split_recipe_arguments
    from m3.core.registry import input_files_unchecked
    from m3.recipes import load_recipe, shipped_recipes

    rows = [
        "| recipe | stage | model | components | command |",
        "|---|---|---|---|---|",
    ]
    for shipped in shipped_recipes():
        files, overrides = split_recipe_arguments(_recipe_items(shipped.command))
        with input_files_unchecked():  # data and checkpoints of other machines
            recipe = load_recipe([ROOT / f for f in files], overrides)
        name = shipped.path.relative_to(ROOT).as_posix()
        stage = f"`{recipe.stage}`" if recipe.stage else "—"
        components = "<br>".join(_components(recipe)) or "—"
        command = shipped.command.replace("|", "\\|")
        model = f"`{recipe.model.preset}`" + "".join(
            f"<br>{key} {value}" for key, value in recipe.model.overrides.items()
        )
        rows.append(
            f"| `{name}`<br>{shipped.description} | {stage} | {model} "
            f"| {components} | `{command}` |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the markers with the generated tables (mkdocs calls this for every page)."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, recipes_table())
    if SECTIONS_MARKER in markdown:
        markdown = markdown.replace(SECTIONS_MARKER, sections_table())
    return markdown
