"""Building the parts a recipe names, or m3's default where it names none.

```python
from m3.recipes import build

chunker = build(recipe, "chunker")                  # the recipe's, or fixed at reference_length
index = build(recipe, "index", dim=embedder.dim, references=len(references))
```

`build` is the one way code gets a part of a recipe: the recipe's spec when it sets one,
else `m3.recipes.defaults.default_spec`, so that every command that cuts, encodes or
searches the knowledge base does it the same way.
"""

from __future__ import annotations

from typing import Any

from m3.core import registry
from m3.core.errors import UserError
from m3.core.values import Problem
from m3.recipes.defaults import KINDS, default_spec
from m3.recipes.errors import RecipeError
from m3.recipes.schema import Recipe, component_paths


def _where(kind: str) -> tuple[str, ...] | None:
    # the one key path that names a single component of the kind
    paths = [p for p, (k, many) in component_paths(Recipe).items() if k == kind and not many]
    return paths[0] if len(paths) == 1 else None


def build(recipe: Recipe, kind: str, /, *, references: int | None = None, **extra: Any) -> Any:
    """Build the part of a kind that a recipe names, or m3's default when it names none.

    Args:
        recipe: A checked recipe.
        kind: A kind of part a recipe names once: `tokenizer`, `chunker`, `encoder`,
            `sparsifier`, `embedder` (top-level keys), `index` or `quantizer` (in `bank:`).
        references: How many references an index will hold (kind `index`): the default
            index depends on it.
        **extra: Constructor arguments that the calling code supplies (an index's `dim`).

    Returns:
        The component.

    Raises:
        RecipeError: For a kind a recipe does not name this way, or one without a default
            (tokenizer, quantizer) that the recipe leaves unset.
        UserError: When the component cannot be built.
    """
    path = _where(kind)
    if path is None:
        names = sorted({k for p, (k, many) in component_paths(Recipe).items() if not many})
        raise RecipeError([Problem(kind, f"not a component section; those are {names}")])
    spec: Any = recipe
    for key in path:
        spec = getattr(spec, key) if spec is not None else None
    if spec is None and kind in KINDS:
        spec = default_spec(kind, recipe.model.config(), references=references)
    if spec is None:
        name = ".".join(path)
        message = f"this recipe has no {name}; add a '{name}:' section"
        raise RecipeError([Problem(name, message)])
    return registry.instantiate(kind, spec, **extra)


def build_tokenizer(recipe: Recipe) -> Any:
    """Build the recipe's tokenizer and check that its ids fit the recipe's model.

    Args:
        recipe: A checked recipe with `tokenizer` and `model` sections.

    Returns:
        The tokenizer (an `m3.data.tokenizer.Tokenizer`).

    Raises:
        RecipeError: When the recipe has no tokenizer.
        UserError: When the tokenizer has more ids than `model.vocab_size`.
    """
    tokenizer = build(recipe, "tokenizer")
    vocab_size = recipe.model.config().vocab_size
    if tokenizer.vocab_size > vocab_size:
        path = recipe.tokenizer.init_args.get("path") if recipe.tokenizer else None
        named = f" (tokenizer.init_args.path: {path})" if path else ""
        raise UserError(
            f"model.vocab_size is {vocab_size}, but the tokenizer has {tokenizer.vocab_size} "
            f"ids{named}: raise model.vocab_size, or use the tokenizer this model was trained with"
        )
    return tokenizer


def build_trainer(options: dict[str, Any], **extra: Any) -> Any:
    """Lightning's `Trainer` from a recipe's `trainer:` options, its refusals as a `UserError`.

    Lightning checks some options only when it builds the Trainer (`devices: 0`, an
    accelerator it does not know): build it before a run folder is claimed, so that a refused
    option leaves nothing behind. Building it writes nothing.

    Args:
        options: `recipe.trainer.to_kwargs()`, or the subset a stage passes on.
        **extra: What m3 itself sets (`default_root_dir`, `logger`, `callbacks`…).

    Returns:
        The `lightning.Trainer`.

    Raises:
        UserError: Naming the `trainer` section and Lightning's reason.
    """
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**options, **extra)
    except (ValueError, MisconfigurationException) as error:
        named = [key for key in options if key in str(error)]
        where = ", ".join(f"trainer.{key}={options[key]!r}" for key in named) or "trainer"
        raise UserError(f"{where}: Lightning refuses it: {error}") from None


def bank_quantizer(recipe: Recipe) -> Any:
    """The vector quantizer a recipe's `bank` section names, untrained, or None.

    Args:
        recipe: A checked recipe.

    Returns:
        A `m3.memory.quantize.VectorQuantizer` of the model's head dimension built from
        `bank.quantizer`; None when the recipe names none (or only `bank.quantizer_file`).
    """
    if recipe.bank is None or recipe.bank.quantizer is None:
        return None
    return build(recipe, "quantizer", dim=recipe.model.config().head_dim)
