"""Components by kind: find them, name them, check their arguments, build them.

A *component* is an interchangeable part of m3, such as a tokenizer or a chunker. Each
kind has one base class; every concrete subclass of it is a component of that kind. A
recipe names a component by `class_path` and passes it `init_args`:

```yaml
chunker:
  class_path: fixed            # the short name of a built-in: m3.data.chunking.FixedChunker
  init_args: {max_tokens: 128}
tokenizer:
  class_path: my_lab.tokenizers.SentencePieceTokenizer   # a dotted path to your own class
```

**Short names.** A class's short name is its class name in snake_case with the kind's
base-class name removed from its end: `FixedChunker` is `fixed`, `HFTokenizer` is `hf`,
`ByteTokenizer` is `byte` (a future `InMemoryStore` would be `in_memory`). The bare class
name (`FixedChunker`) is accepted too. Your own subclasses are named by dotted path
`package.module.ClassName`; importing the module registers them, so `available` lists them
from then on.

Base classes are given as lazy `"module:Class"` strings, so that nothing is imported until
a kind is used; this keeps `m3 check` and `m3 --help` fast. Adding a kind is one line in
`KINDS`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

from m3.core.errors import UserError


@dataclass(frozen=True)
class Kind:
    """One kind of component.

    Attributes:
        base: The base class as a lazy `"module:Class"` string.
        build_to_check: Whether checking a recipe builds the component once, so that its
            constructor's own checks (ranges, consistency) are reported with every other
            problem. Only for kinds whose constructors are cheap and have no side effects.
    """

    base: str
    build_to_check: bool = False


#: Every kind of component: name -> base class. Later kinds (encoder, sparsifier, store,
#: index, embedder, quantizer) are one line each.
KINDS: dict[str, Kind] = {
    # Not built to check: HFTokenizer(train_files=...) trains a BPE and writes its cache.
    "tokenizer": Kind("m3.data.tokenizer:Tokenizer"),
    "chunker": Kind("m3.data.chunking:Chunker", build_to_check=True),
    "encoder": Kind("m3.memory.encoder:MemoryEncoder", build_to_check=True),
    "sparsifier": Kind("m3.memory.sparsifier:Sparsifier", build_to_check=True),
    "embedder": Kind("m3.retrieval.embedders:Embedder", build_to_check=True),
    "store": Kind("m3.backends:MemoryStore"),
    "index": Kind("m3.backends:MemoryIndex", build_to_check=True),
    "quantizer": Kind("m3.memory.quantize:VectorQuantizer", build_to_check=True),
    # Not built to check: building reads files or generates a world.
    "source": Kind("m3.data.sources:TextSource"),
}


class Problem(NamedTuple):
    """One thing wrong with a recipe or with a component's arguments.

    Attributes:
        path: Where it is, as a key path such as `tokenizer.init_args.vocab_size`.
        message: What is wrong and what is expected instead.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a number, attached to a type with `typing.Annotated`.

    ```python
    lr: Annotated[float, Bounds(gt=0)] = 3e-4
    ```

    A value with bounds must also be finite.

    Attributes:
        gt: Exclusive lower bound.
        ge: Inclusive lower bound.
        lt: Exclusive upper bound.
        le: Inclusive upper bound.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def problem(self, value: float) -> str | None:
        """Say what is wrong with a number, if anything.

        Args:
            value: The number.

        Returns:
            A message such as `must be at least 1, got 0`, or None when the value fits.
        """
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        for bound, ok, words in (
            (self.gt, lambda b: value > b, "greater than"),
            (self.ge, lambda b: value >= b, "at least"),
            (self.lt, lambda b: value < b, "less than"),
            (self.le, lambda b: value <= b, "at most"),
        ):
            if bound is not None and not ok(bound):
                return f"must be {words} {bound}, got {value!r}"
        return None


@dataclass(frozen=True)
class MustExist:
    """Marks a string as the path of an input file or directory that must already exist.

    Use it through `InputPath`. Relative paths are relative to the current directory.
    """


#: A string naming an input file or directory; checking a recipe reports it when missing.
InputPath = Annotated[str, MustExist()]

_FILES_CHECKED = [True]


@contextlib.contextmanager
def input_files_unchecked() -> Iterator[None]:
    """Within this block, checks do not report missing input files.

    For checking a recipe written for another machine (a cluster's data paths) here.
    """
    _FILES_CHECKED.append(False)
    try:
        yield
    finally:
        _FILES_CHECKED.pop()


@dataclass(frozen=True)
class ComponentSpec:
    """A component named in a recipe: its class and its constructor arguments.

    Attributes:
        class_path: A short name (`fixed`) or a dotted path (`my_lab.chunkers.MyChunker`).
        init_args: Keyword arguments of the constructor, as plain values.
    """

    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain values, as a recipe writes it."""
        return {"class_path": self.class_path, "init_args": dict(self.init_args)}


def kind_of(name: str) -> Kind:
    """Look up a kind by name.

    Args:
        name: A key of `KINDS`.

    Returns:
        The kind.

    Raises:
        UserError: For an unknown kind, listing the known ones.
    """
    if name not in KINDS:
        raise UserError(f"unknown component kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


def base_class(kind: str) -> type:
    """Import and return the base class of a kind.

    Args:
        kind: A key of `KINDS`.

    Returns:
        The base class.

    Raises:
        UserError: For an unknown kind or when its module cannot be imported.
    """
    module_name, _, class_name = kind_of(kind).base.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        message = f"{kind} components are unavailable: cannot import {module_name}: {err}"
        raise UserError(message) from err
    return getattr(module, class_name)


def _snake(name: str) -> str:
    # "HFTokenizer" -> "hf_tokenizer", "InMemoryStore" -> "in_memory_store", "HDF5" -> "hdf5"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def short_name(cls: type, base: type) -> str:
    """The short name of a component class: snake_case, without the kind's word.

    Args:
        cls: The component class, e.g. `FixedChunker`.
        base: The base class of its kind, e.g. `Chunker`.

    Returns:
        E.g. `fixed`; the whole class name in snake_case when it does not end with the base
        class's name or is nothing else.
    """
    name = cls.__name__
    # the last word of the base's name names the kind: InMemoryStore -> in_memory
    kind_word = re.findall(r"[A-Z][a-z0-9]*", base.__name__)[-1]
    if name.endswith(kind_word) and name != kind_word:
        name = name[: -len(kind_word)]
    return _snake(name)


def class_path_of(cls: type) -> str:
    """The dotted path of a class, `module.ClassName`."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _subclasses(base: type) -> list[type]:
    found: list[type] = []
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in found:
            found.append(cls)
            stack.extend(cls.__subclasses__())
    return found


def available(kind: str) -> dict[str, type]:
    """Every concrete class of a kind that is imported now, by short name.

    Built-in classes (those in `m3`) are found by importing the kind's base module; a
    user's subclass appears once its module has been imported (naming it by dotted path in
    a recipe imports it). When two classes share a short name, a built-in keeps it and the
    other is listed under its dotted path.

    Args:
        kind: A key of `KINDS`.

    Returns:
        Short name (or dotted path) -> class, built-ins first, each group sorted by name.

    Raises:
        UserError: For an unknown kind or when its module cannot be imported.
    """
    base = base_class(kind)
    classes = [
        cls
        for cls in [base, *_subclasses(base)]  # a concrete base is a component too
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_")
    ]

    def builtin(cls: type) -> bool:
        return cls.__module__ == "m3" or cls.__module__.startswith("m3.")

    classes.sort(key=lambda cls: (not builtin(cls), short_name(cls, base), class_path_of(cls)))
    table: dict[str, type] = {}
    for cls in classes:
        name = short_name(cls, base)
        table[class_path_of(cls) if name in table else name] = cls
    return table


def load_module(name: str) -> types.ModuleType:
    """Import a user's module, turning any failure into a clear `UserError`.

    Importing a module registers the components it defines.

    Args:
        name: A dotted module name, e.g. `my_lab.tokenizers`.

    Returns:
        The module.

    Raises:
        UserError: When it cannot be found or fails while importing.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = err.name or name
        hint = (
            " (is it installed, or on PYTHONPATH, or in the current directory?)"
            if name == missing or name.startswith(missing + ".")
            else ""
        )
        message = f"cannot import {name!r}: no module named {missing!r}{hint}"
        raise UserError(message) from err
    except Exception as err:  # the user's module failed while importing: say how
        message = f"importing {name!r} failed: {type(err).__name__}: {err}"
        raise UserError(message) from err


def _import_class(class_path: str) -> Any:
    module_name, _, attr = class_path.rpartition(".")
    module = load_module(module_name)
    if not hasattr(module, attr):
        raise UserError(f"module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def resolve(kind: str, class_path: str) -> type:
    """Find the class that a `class_path` names.

    Args:
        kind: A key of `KINDS`.
        class_path: A short name (`fixed`), a built-in's class name (`FixedChunker`) or a
            dotted path (`my_lab.chunkers.MyChunker`), which is imported.

    Returns:
        The class, a concrete subclass of the kind's base class.

    Raises:
        UserError: For an unknown name (listing the available ones), a module that cannot
            be imported, or a class that is not a concrete subclass of the kind's base.
    """
    base = base_class(kind)
    if "." not in class_path:
        table = available(kind)
        if class_path in table:
            return table[class_path]
        for cls in table.values():
            if cls.__name__ == class_path and class_path_of(cls).startswith("m3."):
                return cls
        names = [name for name in table if "." not in name]
        close = difflib.get_close_matches(class_path, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"unknown {kind} {class_path!r}{hint} Available: {', '.join(names) or 'none'}, "
            f"or the dotted path of your own subclass of {class_path_of(base)}"
        )
    found = _import_class(class_path)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise UserError(f"{class_path!r} is not a subclass of {class_path_of(base)}")
    if inspect.isabstract(found):
        missing = ", ".join(sorted(getattr(found, "__abstractmethods__", ())))
        raise UserError(f"{class_path!r} is abstract: it does not implement {missing}")
    return found


# ---------------------------------------------------------------------------------------
# Checking values against type annotations


def show(value: Any) -> str:
    """A short display of a value in an error message (`None` shows as `null`, as in YAML).

    Args:
        value: Any value.

    Returns:
        Its `repr`, cut to 60 characters.
    """
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def type_name(annotation: Any) -> str:
    """A readable name for a type annotation, as used in error messages.

    Args:
        annotation: A type, such as `int | None` or `list[str]`.

    Returns:
        E.g. `int or null`, `list of str`, `one of 'a', 'b'`.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "null"
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset, Sequence, Collection):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return "list of " + ", ".join(type_name(a) for a in args)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if annotation is Any:
        return "anything"
    if isinstance(annotation, type):
        return "mapping" if annotation is dict else annotation.__name__
    return str(annotation)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(value: Any, annotation: Any, path: str) -> list[Problem]:
    """Check a plain value (as YAML gives it) against a type annotation.

    Understands `bool`, `int`, `float` (an int is accepted), `str`, paths (as strings),
    `None`, `Literal`, unions, `list`/`tuple`/`Sequence`, `dict`/`Mapping`, and
    `Annotated` with `Bounds` or `MustExist`. Anything else is accepted unchecked.

    Args:
        value: The value.
        annotation: The type it should have.
        path: Its key path, used in the problems.

    Returns:
        The problems found; empty when the value fits.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        problems = check_value(value, args[0], path)
        if problems:
            return problems
        for marker in args[1:]:
            if isinstance(marker, Bounds) and _is_number(value):
                message = marker.problem(value)
                if message:
                    problems.append(Problem(path, message))
            exists = not isinstance(value, str) or os.path.exists(value)
            if isinstance(marker, MustExist) and not exists and _FILES_CHECKED[-1]:
                problems.append(Problem(path, f"no such file or directory: {value!r}"))
        return problems
    if origin in (Union, types.UnionType):
        if any(not check_value(value, member, path) for member in args):
            return []
        others = [member for member in args if member is not type(None)]
        if value is not None and len(others) == 1:  # report the inner problem precisely
            return check_value(value, others[0], path)
        return [Problem(path, f"expected {type_name(annotation)}, got {show(value)}")]
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return []
        return [Problem(path, f"expected {type_name(annotation)}, got {show(value)}")]
    if origin in (list, tuple, set, frozenset, Sequence, Collection):
        if not isinstance(value, (list, tuple)):
            return [Problem(path, f"expected {type_name(annotation)}, got {show(value)}")]
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return [Problem(path, f"expected {len(args)} items, got {len(value)}")]
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        problems = []
        for i, (item, item_type) in enumerate(zip(value, item_types, strict=True)):
            problems += check_value(item, item_type, f"{path}[{i}]")
        return problems
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return [Problem(path, f"expected {type_name(annotation)}, got {show(value)}")]
        value_type = args[1] if args else Any
        problems = []
        for key, item in value.items():
            problems += check_value(item, value_type, f"{path}.{key}")
        return problems
    expected = _plain_type_check(annotation)
    if expected is None or expected(value):
        return []
    return [Problem(path, f"expected {type_name(annotation)}, got {show(value)}")]


def _plain_type_check(annotation: Any) -> typing.Callable[[Any], bool] | None:
    # None means "cannot check": an annotation a recipe's plain values cannot be held to.
    if annotation is None or annotation is type(None):
        return lambda v: v is None
    if annotation is bool:
        return lambda v: isinstance(v, bool)
    if annotation is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if annotation is float:
        return _is_number
    if annotation is str:
        return lambda v: isinstance(v, str)
    if isinstance(annotation, type) and issubclass(annotation, (PurePath, os.PathLike)):
        return lambda v: isinstance(v, (str, PurePath))
    if annotation in (list, tuple, set, frozenset):
        return lambda v: isinstance(v, (list, tuple))
    if annotation is dict:
        return lambda v: isinstance(v, Mapping)
    return None


# ---------------------------------------------------------------------------------------
# Component specs: class_path + init_args


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:  # an annotation names something only imported for type checkers
        return {}


def check_arguments(
    cls: type, init_args: Mapping[Any, Any], *, path: str, provided: Collection[str] = ()
) -> list[Problem]:
    """Check constructor arguments against a class's signature, without building it.

    Args:
        cls: The class.
        init_args: The keyword arguments a recipe gives it.
        path: Key path of `init_args`, used in the problems.
        provided: Arguments that the calling code passes itself, so the recipe need not.

    Returns:
        Problems: unknown arguments (with the allowed ones), missing required arguments,
        and values that do not fit their annotation.
    """
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to check against
        return []
    hints = _hints(cls)
    named = {
        name: p
        for name, p in parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    problems = []
    for key, value in init_args.items():
        if key not in named:
            if open_ended and isinstance(key, str):
                continue
            close = difflib.get_close_matches(str(key), list(named), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            allowed = ", ".join(named) or "none"
            message = f"unknown argument of {cls.__name__}; {hint}allowed: {allowed}"
            problems.append(Problem(f"{path}.{key}", message))
        elif key in hints:
            problems += check_value(value, hints[key], f"{path}.{key}")
    for name, p in parameters.items():
        required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if required and name not in init_args and name not in provided:
            message = f"missing required argument of {cls.__name__}"
            problems.append(Problem(f"{path}.{name}", message))
    return problems


def check_spec(
    kind: str, value: Any, *, path: str, provided: Collection[str] = ()
) -> tuple[ComponentSpec | None, list[Problem]]:
    """Check a component spec as a recipe gives it, without building the component.

    Args:
        kind: A key of `KINDS`.
        value: A mapping with `class_path` and optional `init_args`, a `ComponentSpec`, or
            a bare string, short for `{class_path: <string>}`.
        path: Key path of the spec, used in the problems.
        provided: Arguments that the calling code passes itself.

    Returns:
        The spec (None when it could not be read) and every problem found.
    """
    if isinstance(value, ComponentSpec):
        value = value.to_dict()
    if isinstance(value, str):
        value = {"class_path": value}
    if not isinstance(value, Mapping):
        expected = "a class name or a mapping with class_path and init_args"
        message = f"expected {expected}, got {show(value)}"
        return None, [Problem(path, message)]
    problems = [
        Problem(f"{path}.{key}", "unknown key; allowed: class_path, init_args")
        for key in value
        if key not in ("class_path", "init_args")
    ]
    class_path, init_args = value.get("class_path"), value.get("init_args")
    init_args = {} if init_args is None else init_args
    if not isinstance(init_args, Mapping):
        problems.append(Problem(f"{path}.init_args", f"expected a mapping, got {show(init_args)}"))
        init_args = {}
    if class_path is None:
        problems.append(Problem(f"{path}.class_path", "missing required key"))
        return None, problems
    if not isinstance(class_path, str):
        problems.append(Problem(f"{path}.class_path", f"expected str, got {show(class_path)}"))
        return None, problems
    try:
        cls = resolve(kind, class_path)
    except UserError as err:
        return None, [*problems, Problem(f"{path}.class_path", str(err))]
    problems += check_arguments(cls, init_args, path=f"{path}.init_args", provided=provided)
    return ComponentSpec(class_path, dict(init_args)), problems


def check_by_building(kind: str, spec: ComponentSpec, *, path: str) -> list[Problem]:
    """Build a component once and report what its constructor rejects.

    Only for kinds with `Kind.build_to_check`, whose constructors are cheap and have no side
    effects; for other kinds this returns no problems without building anything.

    Args:
        kind: A key of `KINDS`.
        spec: A spec that passed `check_spec`.
        path: Key path of the spec, used in the problems.

    Returns:
        The constructor's complaint, if any, as one problem.
    """
    if not kind_of(kind).build_to_check:
        return []
    cls = resolve(kind, spec.class_path)
    try:
        cls(**spec.init_args)
    except UserError as err:
        return [Problem(f"{path}.init_args", f"{cls.__name__} rejected them: {err}")]
    except Exception as err:  # a constructor may raise anything; report it, do not crash
        message = f"{cls.__name__} rejected them: {type(err).__name__}: {err}"
        return [Problem(f"{path}.init_args", message)]
    return []


def instantiate(kind: str, spec: ComponentSpec | Mapping[str, Any] | str, /, **extra: Any) -> Any:
    """Build a component from its spec.

    Args:
        kind: A key of `KINDS`.
        spec: A `ComponentSpec`, a mapping with `class_path` and `init_args`, or a short
            name.
        **extra: Constructor arguments that the calling code supplies (for example objects
            built from other parts of a recipe); a recipe may not set them too.

    Returns:
        The component.

    Raises:
        UserError: Listing every problem with the spec, or what the constructor rejected.
    """
    checked, problems = check_spec(kind, spec, path=kind, provided=extra)
    if checked is not None:
        problems += [
            Problem(f"{kind}.init_args.{name}", "is set by m3 itself; remove it from the recipe")
            for name in extra
            if name in checked.init_args
        ]
    if problems or checked is None:
        raise UserError(f"cannot build the {kind}:\n" + "\n".join(f"  {p}" for p in problems))
    cls = resolve(kind, checked.class_path)
    try:
        return cls(**checked.init_args, **extra)
    except ValueError as err:
        raise UserError(f"cannot build the {kind} {checked.class_path!r}: {err}") from err


def describe(cls: type) -> str:
    """The first line of a class's own docstring, or an empty string."""
    doc = cls.__dict__.get("__doc__") or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
