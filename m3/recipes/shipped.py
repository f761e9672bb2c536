"""The recipes shipped with m3 in `recipes/`, each opening with the command that runs it."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from m3.core.values import Problem
from m3.recipes.errors import RecipeError
from m3.recipes.loading import read_recipe_file

#: Where the recipes shipped with m3 live (in a source checkout).
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class ShippedRecipe(NamedTuple):
    """A recipe file shipped in `recipes/`.

    Attributes:
        path: The file.
        description: Its one-line `description`.
        command: The command that runs it, from its first line (`# m3 ...`).
    """

    path: Path
    description: str
    command: str


def shipped_recipes(directory: str | Path | None = None) -> list[ShippedRecipe]:
    """List the shipped recipes with their descriptions and commands.

    Every recipe opens with a comment line `# m3 <verb> ...`: the exact command that runs
    it, from the repository's root directory.

    Args:
        directory: Where to look; `RECIPES_DIR` when None.

    Returns:
        The recipes, sorted by path; empty when the directory does not exist (as in an
        installed wheel, which does not carry them).

    Raises:
        RecipeError: When a recipe file cannot be read or lacks its command line.
    """
    root = Path(directory) if directory is not None else RECIPES_DIR
    found, problems = [], []
    for path in sorted(root.rglob("*.yaml")) if root.is_dir() else []:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        command = first[1:].strip() if first.startswith("#") else ""
        if not command.startswith("m3 "):
            problems.append(Problem(str(path), "must open with a comment line '# m3 ...'"))
        layer, trouble = read_recipe_file(path)
        problems += trouble
        description = layer.get("description", "") if layer else ""
        found.append(ShippedRecipe(path, str(description), command))
    if problems:
        raise RecipeError(problems, sources=str(root))
    return found
