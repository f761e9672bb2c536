"""Recipes: load, merge, check and build what a YAML recipe describes.

A recipe is an OmegaConf YAML file. Several compose: files are merged in order, then
`key=value` overrides from the command line are applied, then `${...}` interpolations are
resolved, and then the whole result is checked against the schema, so that every problem
(unknown keys, wrong types, unknown classes, bad constructor arguments, numbers out of
range, missing files) is reported at once, each with its key path, before any work.

```python
from m3.recipes import build, load_recipe

recipe = load_recipe(["recipes/tiny/base.yaml"], ["model.n_layer=6"])
config = recipe.model.config()          # an m3.model.config.Config
tokenizer = build(recipe, "tokenizer")  # an m3.data.tokenizer.Tokenizer
chunker = build(recipe, "chunker")      # the recipe's, or m3's default
```

What lives where (everything is importable from `m3.recipes` itself):

- `schema`: `Recipe`, its plain sections (`world:`, `evaluation:`, `lm_eval:`, `retrieval:`,
  `bank:`, `generation:`) and `ModelSpec`; where a recipe names components;
- `sections`: the sections that are a component's constructor arguments, each option said
  once, on that constructor: `training:` (`Memory3Module`), `data:` (`TextDataModule`),
  `trainer:` (Lightning's `Trainer`);
- `signatures`: those constructors' signatures, read from source without importing torch
  or Lightning, so that checking stays fast;
- `loading`: reading, merging, overrides and interpolation (`load_recipe`);
- `checking`: holding plain values to the schema (`validate`);
- `stages`: the stages of a pipeline recipe (`stage_recipes`);
- `defaults`: the parts m3 uses when a recipe names none (`default_spec`), and m3's
  `Trainer` defaults;
- `building`: the parts a recipe names, or the defaults (`build`, `build_tokenizer`,
  `build_trainer`, `bank_quantizer`);
- `shipped`: the recipes in `recipes/` (`shipped_recipes`);
- `errors`: `RecipeError`.

Components are named by string (`"m3.training.module:Memory3Module"`, the registry's kinds),
never imported here, so that recipes stay low in the layers.

May import: `m3.core`, `m3.model`.
"""

from __future__ import annotations

from m3.core import registry as registry
from m3.core.errors import UserError as UserError
from m3.core.registry import ComponentSpec
from m3.core.values import Bounds, Problem
from m3.model.config import PRESETS, Config
from m3.recipes.building import bank_quantizer, build, build_tokenizer, build_trainer
from m3.recipes.checking import validate
from m3.recipes.defaults import SCANN_ABOVE, default_spec
from m3.recipes.errors import RecipeError
from m3.recipes.loading import load_recipe
from m3.recipes.schema import (
    BankSection,
    EvaluationSection,
    GenerationMetricSection,
    GenerationSection,
    LmEvalSection,
    ModelSpec,
    Recipe,
    RetrievalSection,
    Stage,
    WorldSection,
    component_paths,
)
from m3.recipes.sections import DataSection, Section, TrainerSection, TrainingSection
from m3.recipes.shipped import RECIPES_DIR, ShippedRecipe, shipped_recipes
from m3.recipes.stages import stage_recipes

__all__ = [
    "PRESETS",
    "RECIPES_DIR",
    "SCANN_ABOVE",
    "BankSection",
    "Bounds",
    "ComponentSpec",
    "Config",
    "DataSection",
    "EvaluationSection",
    "GenerationMetricSection",
    "GenerationSection",
    "LmEvalSection",
    "ModelSpec",
    "Problem",
    "Recipe",
    "RecipeError",
    "RetrievalSection",
    "Section",
    "ShippedRecipe",
    "Stage",
    "TrainerSection",
    "TrainingSection",
    "WorldSection",
    "bank_quantizer",
    "build",
    "build_tokenizer",
    "build_trainer",
    "component_paths",
    "default_spec",
    "load_recipe",
    "shipped_recipes",
    "stage_recipes",
    "validate",
]
