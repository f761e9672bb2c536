"""A recipe loaded and checked in Python, and the parts it names built from it.

`python docs/examples/recipe_parts.py recipes/tiny/base.yaml model.n_layer=6`.
"""

from __future__ import annotations

import sys

from m3.recipes import Recipe, build, load_recipe


def recipe_parts(files: list[str], overrides: list[str]) -> Recipe:
    """Load recipe files with `key=value` overrides; print the config and two parts."""
    recipe = load_recipe(files, overrides)  # raises RecipeError listing every problem
    config = recipe.model.config()  # m3.model.config.Config
    tokenizer = build(recipe, "tokenizer")  # m3.data.tokenizer.ByteTokenizer
    chunker = build(recipe, "chunker")  # m3.data.chunking.FixedChunker(max_tokens=128)
    print(config.n_layer, config.memory_shape, type(tokenizer).__name__, chunker.max_tokens)
    return recipe


if __name__ == "__main__":
    files = [a for a in sys.argv[1:] if "=" not in a]
    recipe_parts(files, [a for a in sys.argv[1:] if "=" in a])
