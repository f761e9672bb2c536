"""mkdocs hook: tables generated from the code at build time, so that they cannot drift.

- `<!-- shipped-recipes -->` (docs/recipes.md): one row per file in `recipes/`, composed as
  its opening command composes it (stage, model, components);
- `<!-- recipe-sections -->` (docs/guides/recipes.md): the top-level keys of a recipe, from
  the attributes of `m3.recipes.Recipe` and its type hints;
- `<!-- section-options training -->` (and `data`, `trainer`; docs/guides/recipes.md): the
  options of a section that is a component's constructor arguments, from that constructor's
  signature and its `Args:` (`m3.recipes.sections`), so that each is documented once.

`tests/test_docs.py` and `tests/test_sections.py` check them.
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
OPTIONS_MARKER = re.compile(r"<!-- section-options (\w+) -->")


def _components(section: Any, prefix: str = "") -> list[str]:
    """`name class_path` of every component a recipe section names, in field order."""
    from m3.recipes import Section

    if isinstance(section, Section):  # a component's arguments: its specs by signature
        kinds = section.components()
        entries = [(key, value, key in kinds) for key, value in section.items()]
    else:
        entries = [
            (field.name, getattr(section, field.name), "kind" in field.metadata)
            for field in dataclasses.fields(section)
        ]
    found = []
    for name, value, is_component in entries:
        if is_component and value is not None:
            specs = value if isinstance(value, (list, tuple)) else [value]
            names = ", ".join(f"`{spec.class_path}`" for spec in specs)
            found.append(f"{prefix}{name} {names}")
        elif isinstance(value, Section) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        ):
            found += _components(value, prefix=f"{prefix}{name}.")
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


def _markdown(doc: str, *, lightning_default: bool) -> str:
    # Lightning writes reST (``x``, :class:`x`) and its own defaults, which m3's may replace
    doc = re.sub(r":\w+:`([^`]+)`", r"`\1`", doc).replace("``", "`")
    if lightning_default:
        doc = re.sub(r"\s*Default: (`[^`]*`|[^\s`]+?)\.?(?=\s|$)", "", doc).strip()
    return doc.replace("|", "\\|")


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def options_table(section: str) -> str:
    """The Markdown table of a section's options: key, default, the constructor's docs.

    Args:
        section: `training`, `data` or `trainer`, a field of `m3.recipes.Recipe` whose type
            is a `m3.recipes.Section`.
    """
    _import_m3()
    from m3.core.values import type_name
    from m3.recipes import Recipe, Section

    hint = typing.get_type_hints(Recipe)[section]
    schema = next(
        a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and issubclass(a, Section)
    )
    owner = schema.component.replace(":", ".")
    written = schema.written is not None  # (the trainer: only m3's own defaults are listed)
    keys = list(schema.written) if written else schema.options()
    rows = ["| key | default | type | what it is |", "|---|---|---|---|"]
    for key in keys:
        doc = _markdown(schema.doc(key), lightning_default=written)
        kind = schema.components().get(key)
        shape = f"list of `{kind[0]}` components" if kind else type_name(schema.hint(key))
        rows.append(f"| `{key}` | {_shown(schema.default(key))} | {shape} | {doc} |")
    set_by_m3 = ", ".join(f"`{key}` ({where})" for key, where in schema.provided.items())
    rows.append("")
    rows.append(
        f"The options are the arguments of `{owner}`, documented there"
        + (" (every other argument may be set too, with Lightning's default)" if written else "")
        + f"; m3 sets {set_by_m3} itself."
    )
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
    return OPTIONS_MARKER.sub(lambda found: options_table(found[1]), markdown)
