"""Reading recipes: YAML files merged in order, `key=value` overrides, interpolations.

`load_recipe(files, overrides)` reads each file (safe YAML: plain values only, `1e-3` a
float, dates kept as text, repeated keys refused), merges them in order (mappings key by key,
other values replaced; a component whose `class_path` changes is replaced whole), applies
the overrides (each value read as YAML), resolves `${...}` interpolations with OmegaConf
(the model preset's fields visible), and checks the result (`m3.recipes.checking`). Every
problem is reported at once with its key path and, when several layers were merged, the file
(or the command line) that its value came from.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from m3.core.values import Problem, show
from m3.recipes.checking import key_path, validate
from m3.recipes.errors import RecipeError
from m3.recipes.schema import PRESETS, Recipe, component_paths, preset_fields

_COMMAND_LINE = "the command line"


def _get(data: Any, parts: Sequence[Any]) -> Any:
    for part in parts:
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if not (in_list or (isinstance(data, Mapping) and part in data)):
            raise KeyError(part)
        data = data[part]
    return data


def _normalise(layer: dict[str, Any], components: list[tuple[str, ...]]) -> dict[str, Any]:
    # `tokenizer: byte` is short for `tokenizer: {class_path: byte}`; spelling it out lets
    # a later layer's init_args merge into it.
    for parts in components:
        try:
            parent, value = _get(layer, parts[:-1]), _get(layer, parts)
        except KeyError:
            continue
        if isinstance(value, str) and "${" not in value and isinstance(parent, dict):
            parent[parts[-1]] = {"class_path": value}
    return layer


def _merge(
    base: dict[str, Any], layer: Mapping[str, Any], components: list[tuple[str, ...]]
) -> dict[str, Any]:
    # A layer that names another class for a component replaces it whole: the old class's
    # init_args would not fit the new one.
    for parts in components:
        try:
            old, new = _get(base, parts), _get(layer, parts)
        except KeyError:
            continue
        if (
            isinstance(old, Mapping)
            and isinstance(new, Mapping)
            and "class_path" in new
            and old.get("class_path") != new["class_path"]
        ):
            _get(base, parts[:-1])[parts[-1]] = {}
    return deep_merge(base, layer)


def deep_merge(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a layer over a base: mappings key by key, any other value replaced.

    Args:
        base: The earlier values.
        layer: The later values, which win.

    Returns:
        A new mapping; neither argument is changed.
    """
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _YamlLoader(yaml.SafeLoader):
    """YAML as recipes read it: safe, `1e-3` a float, dates kept as text, no repeated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:  # PyYAML would silently keep the last one
                problem = f"found duplicate key {key!r}"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats without a dot or exponent sign (1e-3, 5e4), which PyYAML reads as text.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
_YamlLoader.add_constructor("tag:yaml.org,2002:timestamp", _YamlLoader.construct_yaml_str)


#: How deep a recipe's values may nest: far deeper than any recipe does (a stage's
#: `stages.<name>.data.train[0].init_args.paths[0]` is 7), and shallow enough for OmegaConf,
#: which recurses several frames per level.
MAX_DEPTH = 32


def _shape_problem(node: Any, parts: tuple[Any, ...] = ()) -> tuple[str, str] | None:
    # A YAML alias can make a value contain itself (`a: &x [*x]`), and flow syntax can nest
    # it hundreds deep: either would exhaust the stack of everything that walks the recipe.
    # Returns the key path of the first such value and what is wrong with it.
    stack: list[tuple[Any, tuple[Any, ...], tuple[int, ...]]] = [(node, parts, ())]
    while stack:
        value, where, ancestors = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        if id(value) in ancestors:
            return key_path(where), "refers to itself (a recursive YAML alias)"
        if len(ancestors) >= MAX_DEPTH:
            return key_path(where), f"nests deeper than {MAX_DEPTH} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        inner = (*ancestors, id(value))
        for key, item in items:
            stack.append((item, (*where, key if isinstance(value, list) else str(key)), inner))
    return None


def read_recipe_file(path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Read one recipe file as plain values, without checking it.

    Args:
        path: The YAML file.

    Returns:
        Its mapping (None when it cannot be read) and the problems, each at the file's path:
        a missing file, a YAML error, repeated keys, a document that is no mapping, a value
        that contains itself or nests deeper than `MAX_DEPTH`.
    """
    name = str(path)
    if not path.exists():
        return None, [Problem(name, "no such recipe file")]
    if not path.is_file():
        return None, [Problem(name, "not a file")]
    try:
        # A SafeLoader: it builds plain values only, never Python objects.
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        return None, [Problem(name, f"cannot read this YAML file: {detail}")]
    if loaded is None:
        return {}, []
    if not isinstance(loaded, dict):
        kind = type(loaded).__name__
        return None, [Problem(name, f"a recipe must be a mapping of keys to values, not a {kind}")]
    shape = _shape_problem(loaded)
    if shape is not None:
        return None, [Problem(name, f"{shape[0] or 'the recipe'} {shape[1]}")]
    return loaded, []


_OVERRIDE = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*)=(.*)", re.DOTALL)


def _read_override(item: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    match = _OVERRIDE.fullmatch(item)
    if match is None:
        message = f"override {item!r} is not of the form key=value (e.g. model.n_layer=6)"
        return None, [Problem("", message)]
    key, text = match.groups()
    try:
        value = yaml.load(text, Loader=_YamlLoader)
    except (ValueError, RecursionError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        return None, [Problem(key, f"cannot parse the value {text!r}: {detail}")]
    shape = _shape_problem(value, tuple(key.split(".")))
    if shape is not None:
        return None, [Problem(*shape)]
    for part in reversed(key.split(".")):
        value = {part: value}
    return value, []


def _plain(node: Any, parts: tuple[Any, ...], problems: list[Problem], bad: list[str]) -> Any:
    # Only what OmegaConf and the schema understand passes; the rest is reported and dropped.
    path = key_path(parts)
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if isinstance(key, str):
                out[key] = _plain(value, (*parts, key), problems, bad)
            else:
                where = key_path((*parts, str(key)))
                problems.append(Problem(where, f"keys must be text, got {show(key)}"))
                bad.append(where)
        return out
    if isinstance(node, list):
        return [_plain(value, (*parts, i), problems, bad) for i, value in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        try:
            OmegaConf.create({"value": node})
        except OmegaConfBaseException as err:
            problems.append(Problem(path, f"invalid interpolation: {str(err).splitlines()[0]}"))
            bad.append(path)
            return None
    if node is None or isinstance(node, (str, int, float, bool)):
        return node
    problems.append(Problem(path, f"unsupported value of type {type(node).__name__}"))
    bad.append(path)
    return None


def _with_preset(merged: dict[str, Any]) -> dict[str, Any]:
    # Spell out the preset's fields so that `${model.vocab_size}` resolves; the fields equal
    # to the preset are dropped again when the model section is checked.
    model = merged.get("model")
    preset = model.get("preset") if isinstance(model, Mapping) else None
    if isinstance(preset, str) and preset in PRESETS:
        merged["model"] = {**preset_fields(model["preset"]), **model}
    return merged


def _resolve(node: Any, parts: tuple[Any, ...], problems: list[Problem], bad: list[str]) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        out: Any = {} if isinstance(node, DictConfig) else []
        for key in keys:
            where = (*parts, key)
            try:
                child = node[key]
            except MissingMandatoryValue:
                message = "missing value (???): set it in a later file or on the command line"
                problems.append(Problem(key_path(where), message))
                bad.append(key_path(where))
                child = None
            except (OmegaConfBaseException, RecursionError) as err:
                detail = str(err).splitlines()[0] if str(err) else type(err).__name__
                problems.append(Problem(key_path(where), f"cannot resolve interpolation: {detail}"))
                bad.append(key_path(where))
                child = None
            value = _resolve(child, where, problems, bad)
            if isinstance(out, dict):
                out[key] = value
            else:
                out.append(value)
        return out
    return node


def _related(path: str, others: list[str]) -> bool:
    # Equal to, inside, or around one of the paths: used to avoid reporting twice.
    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or a.startswith(b + "[")

    return any(inside(path, other) or inside(other, path) for other in others)


def _origin(path: str, layers: list[tuple[str, dict[str, Any]]]) -> str | None:
    parts: list[Any] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(index) if index else name)
    for label, layer in reversed(layers):
        try:
            value = _get(layer, parts)
        except KeyError:
            continue
        # A section may hold keys from several layers: name the origin of values only.
        return None if isinstance(value, Mapping) else label
    return None


def _describe_sources(paths: Sequence[Path], overrides: Sequence[str]) -> str:
    names = [str(p) for p in paths]
    if overrides:
        names.append(f"{len(overrides)} override{'s' if len(overrides) != 1 else ''}")
    if len(names) <= 1:
        return names[0] if names else "the recipe"
    return ", ".join(names[:-1]) + " and " + names[-1]


def load_recipe(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge and check a recipe.

    Files are merged in order (mappings merge key by key; other values, lists included,
    replace). A file that names a different `class_path` for a component replaces that
    component whole. Then `overrides` (`key=value`, the value read as YAML) apply, then
    interpolations are resolved, then everything is checked. Nothing is built except
    components of kinds with `build_to_check`, and no file is written.

    Args:
        paths: One or more recipe files.
        overrides: `key=value` items, applied in order after all files.

    Returns:
        The checked recipe.

    Raises:
        RecipeError: Listing every problem found, each with its key path.
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    sources = _describe_sources(files, overrides)
    components = list(component_paths(Recipe))
    problems: list[Problem] = []
    if not files:
        problems.append(Problem("", "name at least one recipe file"))
    layers: list[tuple[str, dict[str, Any]]] = []
    for path in files:
        layer, found = read_recipe_file(path)
        problems += found
        if layer is not None:
            layers.append((str(path), _normalise(layer, components)))
    if problems:  # without every file, the rest cannot be checked meaningfully
        raise RecipeError(problems, sources=sources)
    # An override that cannot be read is reported and skipped; the rest is still checked,
    # but not what the skipped override would have set.
    unresolved: list[str] = []
    command_line: dict[str, Any] = {}
    unread: list[Problem] = []  # (from the command line, whatever the files set there)
    for item in overrides:
        layer, found = _read_override(item)
        unread += found
        unresolved += [p.path for p in found if p.path]
        if layer is not None:
            command_line = deep_merge(command_line, _normalise(layer, components))
    if overrides:
        layers.append((_COMMAND_LINE, command_line))

    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged = _merge(merged, copy.deepcopy(layer), components)
    config = OmegaConf.create(_with_preset(_plain(merged, (), problems, unresolved)))
    data = _resolve(config, (), problems, unresolved)
    recipe, found = validate(data)
    problems += [p for p in found if not _related(p.path, unresolved)]
    if problems or unread:
        if len(layers) > 1:
            problems = [_with_origin(p, layers) for p in problems]
            unread = [
                Problem(p.path, f"{p.message} (from {_COMMAND_LINE})") if p.path else p
                for p in unread
            ]
        raise RecipeError([*unread, *problems], sources=sources)
    assert recipe is not None  # no problems means a recipe was built
    return recipe


def _with_origin(problem: Problem, layers: list[tuple[str, dict[str, Any]]]) -> Problem:
    origin = _origin(problem.path, layers)
    if origin is None:
        return problem
    return Problem(problem.path, f"{problem.message} (from {origin})")
