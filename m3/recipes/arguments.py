"""`RECIPE… [KEY=VALUE…]` on a command line: the arguments of every verb that runs a recipe.

```python
parser = argparse.ArgumentParser()
add_recipe_arguments(parser)
recipe = recipe_from_args(parser.parse_args(["recipes/tiny/base.yaml", "seed=3"]))
```

`m3.cli` re-exports these functions under the same names.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m3.recipes import Recipe

__all__ = ["add_recipe_arguments", "recipe_from_args", "split_recipe_arguments"]


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Give a verb the arguments `RECIPE… [KEY=VALUE…]`.

    Args:
        parser: The verb's parser.
    """
    parser.usage = "%(prog)s [options] RECIPE [RECIPE ...] [KEY=VALUE ...]"
    parser.add_argument(
        "recipe_items",
        nargs="+",
        metavar="RECIPE|KEY=VALUE",
        help=(
            "recipe YAML files, merged in order, then KEY=VALUE overrides applied after all "
            "files (VALUE is read as YAML, e.g. model.n_layer=6 'model.memory_layers=[0,1]')"
        ),
    )


def split_recipe_arguments(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate recipe files from `key=value` overrides.

    Args:
        items: The command line's recipe arguments, in order.

    Returns:
        The files and the overrides, each in order. An item with `=` is an override
        unless a file of that name exists.
    """
    files: list[str] = []
    overrides: list[str] = []
    for item in items:
        (overrides if "=" in item and not os.path.isfile(item) else files).append(item)
    return files, overrides


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Load and check the recipe that a verb's command line names.

    Args:
        args: Parsed arguments of a verb set up with `add_recipe_arguments`.

    Returns:
        The checked recipe.

    Raises:
        RecipeError: Listing every problem with the recipe.
    """
    from m3.recipes import load_recipe

    files, overrides = split_recipe_arguments(args.recipe_items)
    return load_recipe(files, overrides)
