"""The stages of a pipeline recipe: each stage's own recipe, checked.

A `pipeline` recipe (`m3 run`) lists its stages under `stages:`; a stage's recipe is the
pipeline recipe without `stages`, with the stage's keys merged over it, and its outputs in
`<output>/<name>` unless it sets `output`. Checking a pipeline checks every stage, and the
problems of each are reported under `stages.<name>`.
"""

from __future__ import annotations

import re

from m3.core.values import Problem
from m3.recipes.checking import validate
from m3.recipes.errors import RecipeError
from m3.recipes.loading import deep_merge
from m3.recipes.schema import Recipe


def stage_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The recipe of each stage of a pipeline recipe.

    A stage's recipe is the pipeline recipe without `stages`, with the stage's keys merged
    over it (mappings key by key, other values replaced) and `output` defaulting to
    `<output>/<name>`.

    Args:
        recipe: A checked recipe with `stage: pipeline`.

    Returns:
        `(name, recipe)` of every stage, in order.

    Raises:
        RecipeError: Listing the problems of every stage, each under `stages.<name>`.
    """
    stages, problems = checked_stages(recipe)
    if problems:
        raise RecipeError(problems, sources="the pipeline recipe")
    return stages


def _stage_recipe(recipe: Recipe, name: str) -> tuple[Recipe | None, list[Problem]]:
    base = {k: v for k, v in recipe.to_dict().items() if k not in ("stages", "description")}
    base["output"] = f"{recipe.output}/{name}"
    base.pop("stage", None)
    merged = deep_merge(base, (recipe.stages or {})[name])
    merged.setdefault("description", f"stage {name} of: {recipe.description}")
    return validate(merged)


def checked_stages(recipe: Recipe) -> tuple[list[tuple[str, Recipe]], list[Problem]]:
    """Every stage's recipe, checked once, and the problems of all of them.

    Args:
        recipe: A recipe with `stages`.

    Returns:
        `(name, recipe)` of the stages that passed, and every problem found, each under
        `stages.<name>`.
    """
    if recipe.stage != "pipeline":
        message = f"a recipe with stages has stage: pipeline, got {recipe.stage!r}"
        return [], [Problem("stage", message)]
    if not recipe.stages:
        return [], [Problem("stages", "a pipeline needs at least one stage")]
    stages: list[tuple[str, Recipe]] = []
    problems: list[Problem] = []
    for name, keys in recipe.stages.items():
        where = f"stages.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            message = "a stage name is letters, digits, '_', '-' or '.'"
            problems.append(Problem(where, message))
        stage = keys.get("stage")
        if stage is None or stage == "pipeline":
            message = f"each stage sets its stage (not pipeline), got {stage!r}"
            problems.append(Problem(f"{where}.stage", message))
            continue
        checked, found = _stage_recipe(recipe, name)
        problems += [Problem(f"{where}: {p.path}", p.message) for p in found]
        if checked is not None:
            stages.append((name, checked))
    return stages, problems
