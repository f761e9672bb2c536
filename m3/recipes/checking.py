"""Checking plain values against a recipe's schema, every problem reported with its key path.

`validate` holds a mapping (as YAML gives it, interpolations resolved) to `Recipe`:

- a plain section (a dataclass) by its fields' annotations (`m3.core.values.check_value`);
- the model section against `m3.model.config.Config` and its presets;
- a component spec against its class's constructor (`m3.core.registry.check_spec`), built
  once where its kind allows (`check_by_building`);
- a section that is a component's arguments (`m3.recipes.sections`) against that
  component's constructor, through `m3.core.registry.check_arguments`, without importing it;
- then the cross-checks that need the whole recipe: the bank section, and each stage of a
  pipeline.

Nothing stops at the first problem; `m3.recipes.loading.load_recipe` adds the file each
wrong value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from m3.core import registry
from m3.core.errors import UserError
from m3.core.values import Problem, check_value, show
from m3.model.config import PRESETS, Config
from m3.recipes.building import bank_quantizer
from m3.recipes.schema import ModelSpec, Recipe, preset_fields
from m3.recipes.sections import Section

T = TypeVar("T")


def validate(data: Any, schema: type[T] = Recipe) -> tuple[T | None, list[Problem]]:
    """Check plain data (interpolations already resolved) against a recipe schema.

    Args:
        data: A mapping, as YAML gives it.
        schema: The dataclass to check against; `Recipe` unless you check a section.

    Returns:
        The dataclass instance (None when there were problems) and every problem found.
    """
    from m3.recipes.stages import checked_stages  # (stages check with validate)

    problems: list[Problem] = []
    result = _check_section(data, schema, "", problems)
    if isinstance(result, Recipe) and not problems:
        problems += _check_bank(result)
    if isinstance(result, Recipe) and not problems and result.stages is not None:
        problems += checked_stages(result)[1]
    return (result if not problems else None), problems


def key_path(parts: Sequence[Any]) -> str:
    """A key path as problems name it.

    Args:
        parts: Keys and list indices, e.g. `["data", "train", 0, "class_path"]`.

    Returns:
        E.g. `data.train[0].class_path`.
    """
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def unknown_key(path: str, key: Any, allowed: Sequence[str]) -> Problem:
    """The problem of a key that a section does not have.

    Args:
        path: The section's key path (empty at the top).
        key: The unknown key.
        allowed: The section's keys.

    Returns:
        `unknown key; did you mean ...? allowed: ...`, at the key's path.
    """
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    message = f"unknown key; {hint}allowed: {', '.join(allowed)}"
    return Problem(key_path([path, key] if path else [key]), message)


def _is_plain_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and tp not in (ModelSpec, registry.ComponentSpec)


def _check_section(value: Any, schema: type, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {show(value)}"))
        return None
    before = len(problems)
    hints = get_type_hints(schema, include_extras=True)
    fields = [f for f in dataclasses.fields(schema) if f.init]
    names = [f.name for f in fields]
    for key in value:
        if key not in names:
            problems.append(unknown_key(path, key, names))
    kwargs = {}
    for f in fields:
        where = f"{path}.{f.name}" if path else f.name
        if f.name in value:
            kind = f.metadata.get("kind")
            kwargs[f.name] = _check_field(
                value[f.name], hints[f.name], kind, f.metadata.get("provided", ()), where, problems
            )
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(Problem(where, "missing required key"))
    if len(problems) > before:
        return None
    return schema(**kwargs)


def _check_field(
    value: Any,
    annotation: Any,
    kind: str | None,
    provided: Sequence[str],
    path: str,
    problems: list[Problem],
) -> Any:
    union = get_origin(annotation) in (Union, types.UnionType)
    members = [a for a in get_args(annotation) if a is not type(None)] if union else [annotation]
    if value is None and union and type(None) in get_args(annotation):
        return None
    inner = members[0] if len(members) == 1 else annotation
    if kind is not None:
        many = get_origin(inner) is list
        return _check_components(value, kind, many, provided, path, problems)
    if inner is ModelSpec:
        return _check_model(value, path, problems)
    if isinstance(inner, type) and issubclass(inner, Section):
        return _check_arguments(value, inner, path, problems)
    if _is_plain_section(inner):
        return _check_section(value, inner, path, problems)
    problems += check_value(value, annotation, path)
    return value


def _check_components(
    value: Any,
    kind: str,
    many: bool,
    provided: Sequence[str],
    path: str,
    problems: list[Problem],
) -> Any:
    if many:
        if not isinstance(value, list) or not value:
            message = f"expected a non-empty list of components, got {show(value)}"
            problems.append(Problem(path, message))
            return None
        specs = []
        for i, item in enumerate(value):
            spec, found = registry.check_spec(kind, item, path=f"{path}[{i}]")
            if spec is not None and not found:
                found = registry.check_by_building(kind, spec, path=f"{path}[{i}]")
            problems += found
            specs.append(spec)
        return specs
    spec, found = registry.check_spec(kind, value, path=path, provided=provided)
    if spec is not None:
        found += [
            Problem(f"{path}.init_args.{name}", "is set by m3 itself; remove it from the recipe")
            for name in provided
            if name in spec.init_args
        ]
    if spec is not None and not found and not provided:
        # (a part whose arguments m3 completes is built, and checked, when it is used)
        found = registry.check_by_building(kind, spec, path=path)
    problems += found
    return spec


def _check_arguments(
    value: Any, schema: type[Section], path: str, problems: list[Problem]
) -> Section | None:
    # a section that is a component's constructor arguments: its keys are the parameters
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {show(value)}"))
        return None
    before = len(problems)
    allowed = schema.options()
    for key in value:
        if key in schema.provided:
            message = f"is set by m3 itself ({schema.provided[key]}); remove it from the recipe"
            problems.append(Problem(key_path([path, key]), message))
        elif key not in allowed:
            problems.append(unknown_key(path, key, allowed))
    components = schema.components()
    checked: dict[str, Any] = {}
    for key in allowed:  # in the constructor's order, as the problems are listed
        if key not in value:
            continue
        where = key_path([path, key])
        if value[key] is None and schema.default(key) is None:
            checked[key] = None  # unset, as the section writes it out (`data.train: null`)
            continue
        if key in components:
            kind, many = components[key]
            checked[key] = _check_components(value[key], kind, many, (), where, problems)
            continue
        owner = schema.owner(key)  # the constructor that takes the key, read, not imported
        problems += registry.check_arguments(
            owner.stand_in({key: schema.hint(key)}),
            {key: value[key]},
            path=path,
            provided=owner.names(),  # a recipe may leave any option unset
        )
        checked[key] = value[key]
    if len(problems) > before:
        return None
    return schema(checked)


def _check_model(value: Any, path: str, problems: list[Problem]) -> ModelSpec | None:
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {show(value)}"))
        return None
    before = len(problems)
    presets = ", ".join(PRESETS)
    preset = value.get("preset")
    if "preset" not in value:
        message = f"missing required key; choose one of {presets}"
        problems.append(Problem(f"{path}.preset", message))
    elif not isinstance(preset, str) or preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown model preset {show(preset)}{hint} Choose one of {presets}"
        problems.append(Problem(f"{path}.preset", message))
    hints = get_type_hints(Config)
    allowed = ["preset", *(name for name in hints if name != "name")]
    fitting = {}
    for key, item in value.items():
        if key == "preset":
            continue
        if key not in allowed:
            problems.append(unknown_key(path, key, allowed))
            continue
        found = check_value(item, hints[key], f"{path}.{key}")
        problems += found
        if not found:
            fitting[key] = item
    if not isinstance(preset, str) or preset not in PRESETS:
        return None
    # Config checks ranges and consistency itself; ask it even when other keys are wrong.
    baseline = preset_fields(preset)
    overrides = {k: v for k, v in fitting.items() if baseline.get(k) != v}
    try:
        Config.from_name(preset, **overrides)
    except UserError as err:
        problems += _config_problems(str(err), path, allowed)
    if len(problems) > before:
        return None
    return ModelSpec(preset, overrides)


def _config_problems(message: str, path: str, fields: Sequence[str]) -> list[Problem]:
    # Config reports "invalid model config 'x': a must ...; b must ..."; give each its key.
    # A rotary scaling's own problems read "rope_scaling: rope_type ..." or
    # "rope_scaling.factor must ...": they belong to model.rope_scaling (or its parameter).
    detail = message.split(": ", 1)[-1]
    problems = []
    for part in detail.split("; "):
        key = part.split(" ", 1)[0]
        if key in fields and part.startswith(f"{key} must"):
            problems.append(Problem(f"{path}.{key}", part[len(key) + 1 :]))
        elif part.startswith("rope_scaling: "):
            problems.append(Problem(f"{path}.rope_scaling", part.removeprefix("rope_scaling: ")))
        elif part.startswith("rope_scaling.") and " " in part:
            problems.append(Problem(f"{path}.{key}", part[len(key) + 1 :]))
        else:
            problems.append(Problem(path, part))
    return problems


def _check_bank(recipe: Recipe) -> list[Problem]:
    """Cross-checks of the bank section that need the model (run after the schema)."""
    bank = recipe.bank
    if bank is None:
        return []
    problems = []
    if bank.quantizer is not None and bank.quantizer_file is not None:
        message = "give either bank.quantizer (trained by the build) or bank.quantizer_file"
        problems.append(Problem("bank.quantizer_file", message))
    if bank.quantizer is not None:
        try:
            bank_quantizer(recipe)
        except UserError as err:
            detail = str(err).split("\n")[-1].strip()
            problems.append(Problem("bank.quantizer.init_args", f"rejected: {detail}"))
    if bank.index is not None:  # built once (cheap, nothing opened), as at the end of a build
        embedder_args = recipe.embedder.init_args if recipe.embedder is not None else {}
        dim = embedder_args.get("dim")
        try:
            registry.instantiate("index", bank.index, dim=dim if isinstance(dim, int) else 256)
        except UserError as err:
            detail = str(err).split("\n")[-1].strip()
            problems.append(Problem("bank.index.init_args", f"rejected: {detail}"))
    return problems
