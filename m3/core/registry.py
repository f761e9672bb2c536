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

import difflib
import importlib
import inspect
import re
import sys
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from m3.core.checks import import_class, import_module
from m3.core.errors import UserError
from m3.core.lazy import MOVED_MODULES

# Also importable from here, where components and m3 0.1 code import them from
from m3.core.values import Bounds as Bounds
from m3.core.values import InputPath as InputPath
from m3.core.values import MustExist as MustExist
from m3.core.values import Problem, check_value, show
from m3.core.values import input_files_unchecked as input_files_unchecked
from m3.core.values import type_name as type_name


@dataclass(frozen=True)
class Kind:
    """One kind of component.

    Attributes:
        base: The base class as a lazy `"module:Class"` string.
        build_to_check: Whether checking a recipe builds the component once, so that its
            constructor's own checks (ranges, consistency) are reported with every other
            problem. Only for kinds whose constructors are cheap and have no side effects.
        modules: Further modules that define built-in classes of the kind, imported with its
            base so that every built-in is listed whatever was imported before.
    """

    base: str
    build_to_check: bool = False
    modules: tuple[str, ...] = ()


#: Every kind of component: name -> base class (and the modules of its built-ins). Adding a
#: kind is one line.
KINDS: dict[str, Kind] = {
    # Not built to check: HFTokenizer(train_files=...) trains a BPE and writes its cache.
    "tokenizer": Kind("m3.data.tokenizer:Tokenizer"),
    "chunker": Kind("m3.data.chunking:Chunker", build_to_check=True),
    "encoder": Kind("m3.memory.encoder:MemoryEncoder", build_to_check=True),
    "sparsifier": Kind("m3.memory.sparsifier:Sparsifier", build_to_check=True),
    "embedder": Kind(
        "m3.retrieval.embedders:Embedder", build_to_check=True, modules=("m3.retrieval.sentence",)
    ),
    "store": Kind(
        "m3.backends:MemoryStore", modules=("m3.backends.sharded", "m3.backends.cold_start")
    ),
    "index": Kind("m3.backends:MemoryIndex", build_to_check=True),
    "quantizer": Kind("m3.memory.quantize:VectorQuantizer", build_to_check=True),
    # Not built to check: building reads files or generates a world.
    "source": Kind("m3.data.sources:TextSource"),
}


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


def kind_of_class(cls: type) -> str | None:
    """The kind a component class belongs to, or None when it is no component.

    Args:
        cls: A class; its kind's base module is necessarily imported already.

    Returns:
        A key of `KINDS`.
    """
    for name, kind in KINDS.items():
        module, _, base = kind.base.partition(":")
        loaded = sys.modules.get(module)
        if loaded is not None and issubclass(cls, getattr(loaded, base)):
            return name
    return None


def identity(cls: type) -> str:
    """How fingerprints and manifests name a component class, so that moving a file breaks nothing.

    Args:
        cls: A component class.

    Returns:
        `kind:short_name` for a built-in class (e.g. `embedder:hashed_ngram`); the dotted
        class path for a user's own class (or any class that is no component).
    """
    kind = kind_of_class(cls)
    if kind is not None and is_builtin(cls):
        name = short_name(cls, base_class(kind))
        if available(kind).get(name) is cls:
            return f"{kind}:{name}"
    return class_path_of(cls)


def legacy_class_path(cls: type) -> str:
    """The dotted path m3 0.1 recorded for a class, before its module moved.

    Fingerprints written by m3 0.1 hashed this path; checks accept them through it.

    Args:
        cls: A class.

    Returns:
        E.g. `m3.embedders.HashedNgramEmbedder` for `m3.retrieval.embedders`'s class; the
        current dotted path for a class whose module did not move.
    """
    module = cls.__module__
    for old, new in MOVED_MODULES.items():
        if module == new or module.startswith(new + "."):
            return f"{old}.{cls.__qualname__}"
    for old, new in MOVED_MODULES.items():  # a class that left for a module of its own
        if new in sys.modules and getattr(sys.modules[new], cls.__name__, None) is cls:
            return f"{old}.{cls.__qualname__}"
    return class_path_of(cls)


def class_of(identity: str, kind: str | None = None) -> type:
    """The class an identity names: `kind:name`, a dotted path, or an m3 0.1 dotted path.

    Args:
        identity: What `identity` returned, or a dotted path that an older file recorded.
        kind: The kind the class must be of, when known.

    Returns:
        The class.

    Raises:
        UserError: For an unknown kind or name, a module that cannot be imported, or a class
            of another kind.
    """
    if ":" in identity:
        named_kind, _, name = identity.partition(":")
        if kind is not None and named_kind != kind:
            raise UserError(f"{identity!r} names a {named_kind}, expected a {kind}")
        return resolve(named_kind, name)
    # m3 0.1 recorded module paths; read them at their new place, without the warning
    found = import_class(identity, moved=MOVED_MODULES)
    if not isinstance(found, type) or (
        kind is not None and not issubclass(found, base_class(kind))
    ):
        raise UserError(f"{identity!r} is not a {kind or 'class'}")
    return found


def is_builtin(cls: type) -> bool:
    """Whether a class is one of m3's own."""
    return cls.__module__ == "m3" or cls.__module__.startswith("m3.")


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

    Built-in classes (those in `m3`) are found by importing the kind's modules; a
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
    for module in kind_of(kind).modules:
        importlib.import_module(module)
    classes = [
        cls
        for cls in [base, *_subclasses(base)]  # a concrete base is a component too
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_")
    ]

    classes.sort(key=lambda cls: (not is_builtin(cls), short_name(cls, base), class_path_of(cls)))
    table: dict[str, type] = {}
    for cls in classes:
        name = short_name(cls, base)
        table[class_path_of(cls) if name in table else name] = cls
    return table


#: Import a user's module, which registers the components it defines.
load_module = import_module


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
    found = import_class(class_path)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise UserError(f"{class_path!r} is not a subclass of {class_path_of(base)}")
    if inspect.isabstract(found):
        missing = ", ".join(sorted(getattr(found, "__abstractmethods__", ())))
        raise UserError(f"{class_path!r} is abstract: it does not implement {missing}")
    return found


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
