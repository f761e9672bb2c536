"""mkdocs hook: the table of shipped recipes on docs/recipes.md, generated at build time.

The page holds the marker `<!-- shipped-recipes -->`; every build replaces it with one row
per file in `recipes/`, composed as its opening command composes it (stage, model,
components), so the table cannot drift from the recipes. `tests/test_docs.py` checks it.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- shipped-recipes -->"


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


def recipes_table() -> str:
    """The Markdown table of the shipped recipes: file, stage, model, components, command."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from m3.cli import split_recipe_arguments
    from m3.recipes import load_recipe, shipped_recipes
    from m3.registry import input_files_unchecked

    rows = [
        "| recipe | stage | model | components | command |",
        "|---|---|---|---|---|",
    ]
    for shipped in shipped_recipes():
        files, overrides = split_recipe_arguments(shlex.split(shipped.command)[2:])
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
    """Replace the marker with the generated table (mkdocs calls this for every page)."""
    return markdown.replace(MARKER, recipes_table()) if MARKER in markdown else markdown
