"""Constructor signatures read from the source, without importing the class.

A section such as `training:` holds the constructor arguments of a component
(`m3.recipes.sections`), and is checked against that constructor. Importing the classes to
read their signatures would load torch and Lightning (seconds) for a check that needs
neither; `signature("m3.training.module:Memory3Module")` reads the class's `__init__` from
its file instead: its parameters, their literal defaults, the documentation of each (the
Google-style `Args:` of the class and of `__init__`), and their annotations, evaluated when
first asked for:

- names from the standard library and from `m3.core` (`Bounds`, `InputPath`) are the real
  objects;
- a name bound by an assignment (`Stage = Literal["warmup", "continual"]`) is its value,
  read the same way from the module that assigns it, following imports;
- a class stands in as an empty class of the same name (`is_stand_in`), for which
  `m3.core.values.check_value` accepts any value, as it does for the real class.

What cannot be read from the source (a class without its own `__init__`, a file that is not
there) is read by importing the class. `tests/test_sections.py` checks that what this module
reads agrees with `inspect.signature` and `typing.get_type_hints` of the imported classes.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import importlib.util
import inspect
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Modules whose names annotations use as the real objects (besides the standard library):
#: they are light, and their markers (`Bounds`) carry the checks.
REAL_MODULES = ("m3.core.values", "m3.core.registry", "m3.core.errors", "typing_extensions")

_EMPTY = inspect.Parameter.empty


class _ModuleName(str):
    """A module named in an annotation (`import torch` ... `torch.Tensor`)."""


@dataclass(frozen=True)
class Argument:
    """One parameter of a constructor, as its source says.

    Attributes:
        name: The parameter's name.
        kind: Positional-or-keyword, keyword-only, `*args` or `**kwargs`.
        default: The default value, or `inspect.Parameter.empty` when it is required (or its
            default is not a literal).
        doc: Its description in the docstring's `Args:`, on one line; empty when none.
        annotation: The annotation as the source writes it (an `ast` expression), the type
            itself when the class was imported to read it, or None when there is none.
    """

    name: str
    kind: inspect._ParameterKind
    default: Any = _EMPTY
    doc: str = ""
    annotation: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Signature:
    """The constructor of a class, read without importing it.

    Attributes:
        target: The class, `"module:Class"`.
        name: The class's name.
        arguments: The constructor's parameters after `self`, in order.
        doc: The class's docstring (empty when none).
        module: The module that defines the class, where its annotations' names are looked
            up.
    """

    target: str
    name: str
    arguments: tuple[Argument, ...]
    doc: str = ""
    module: str = ""

    def __getitem__(self, name: str) -> Argument:
        for argument in self.arguments:
            if argument.name == name:
                return argument
        raise KeyError(name)

    def names(self) -> list[str]:
        """The names of the parameters that can be given by keyword, in order."""
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [a.name for a in self.arguments if a.kind in keyword]

    def words(self, name: str) -> frozenset[str]:
        """The names a parameter's annotation mentions, read without evaluating it.

        Args:
            name: The parameter.

        Returns:
            Its identifiers (names, attributes, words of quoted forward references), e.g.
            `{"Sequence", "TextSource"}`: a cheap test of what `hint` would involve.
        """
        node = self[name].annotation
        if node is None:
            return frozenset()
        if not isinstance(node, ast.AST):
            return frozenset(re.findall(r"\w+", repr(node)))
        found: set[str] = set()
        for child in ast.walk(node):
            if isinstance(child, ast.Name):
                found.add(child.id)
            elif isinstance(child, ast.Attribute):
                found.add(child.attr)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                found.update(re.findall(r"\w+", child.value))
        return frozenset(found)

    def hint(self, name: str) -> Any:
        """The annotation of a parameter, evaluated (`Any` when it has none).

        Args:
            name: The parameter.

        Returns:
            The type, with `Annotated` markers kept; classes other than those of the standard
            library and `m3.core` are stand-ins (`is_stand_in`).
        """
        node = self[name].annotation
        if node is None:
            return Any
        if not isinstance(node, ast.AST):  # read by importing the class
            return node
        return _hint(self.module, node)

    def stand_in(self, hints: Mapping[str, Any]) -> type:
        """A class with this constructor's signature and the given hints.

        For `m3.core.registry.check_arguments`, which reads `inspect.signature(cls)` and the
        hints of `cls.__init__`, so that it checks arguments without the real class.

        Args:
            hints: Parameter -> the type its value is checked against (`hint`, or a
                narrower one); parameters left out are not checked.

        Returns:
            An empty class named like the real one.
        """
        parameters = [inspect.Parameter(a.name, a.kind, default=a.default) for a in self.arguments]

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # never called
            raise TypeError("a stand-in for checking arguments")

        __init__.__annotations__ = dict(hints)
        return type(
            self.name,
            (),
            {"__init__": __init__, "__signature__": inspect.Signature(parameters)},
        )


def is_stand_in(annotation: Any) -> bool:
    """Whether a type is a stand-in for a class that `signature` did not import.

    Args:
        annotation: A type, as `Signature.hint` gives it.

    Returns:
        True for a stand-in class.
    """
    return isinstance(annotation, type) and "__m3_stands_for__" in annotation.__dict__


def stands_for(annotation: Any) -> str | None:
    """Where a class is defined, whether a stand-in or the real one.

    Args:
        annotation: A type, as `Signature.hint` gives it.

    Returns:
        `"module:Class"`; None for anything that is not a class.
    """
    if is_stand_in(annotation):
        return annotation.__dict__["__m3_stands_for__"]
    if isinstance(annotation, type):
        return f"{annotation.__module__}:{annotation.__qualname__}"
    return None


def locate(target: str) -> str:
    """Where a class named `"module:Class"` is defined, following the module's imports.

    Args:
        target: E.g. `"m3.backends:MemoryStore"`, which `m3.backends` imports.

    Returns:
        E.g. `"m3.backends.base:MemoryStore"`; `target` itself when it cannot be followed.
    """
    module, _, name = target.partition(":")
    found = _lookup(module, name)
    return stands_for(found) or target


@functools.cache
def signature(target: str) -> Signature:
    """The constructor signature of a class, read from its source.

    Args:
        target: `"module:Class"`, e.g. `"m3.training.module:Memory3Module"`; the class may
            be imported into that module from another.

    Returns:
        The signature. A class whose `__init__` is not in its own body, or whose source
        cannot be found, is imported to read it.
    """
    module, _, name = target.partition(":")
    found = _class_node(module, name)
    if found is None:
        return _imported_signature(target)
    where, node = found
    init = next(
        (s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None
    )
    if init is None:
        return _imported_signature(target)
    docs = {**args_doc(ast.get_docstring(node) or ""), **args_doc(ast.get_docstring(init) or "")}
    spec = init.args
    positional = [*spec.posonlyargs, *spec.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(spec.defaults))
    defaults += spec.defaults
    P = inspect.Parameter
    kinds = [P.POSITIONAL_ONLY] * len(spec.posonlyargs) + [P.POSITIONAL_OR_KEYWORD] * len(spec.args)
    rows: list[tuple[ast.arg, inspect._ParameterKind, ast.expr | None]] = list(
        zip(positional, kinds, defaults, strict=True)
    )[1:]  # without self
    if spec.vararg:
        rows.append((spec.vararg, P.VAR_POSITIONAL, None))
    rows += [(a, P.KEYWORD_ONLY, d) for a, d in zip(spec.kwonlyargs, spec.kw_defaults, strict=True)]
    if spec.kwarg:
        rows.append((spec.kwarg, P.VAR_KEYWORD, None))
    arguments = tuple(
        Argument(arg.arg, kind, _default(where, default), docs.get(arg.arg, ""), arg.annotation)
        for arg, kind, default in rows
    )
    return Signature(target, name, arguments, ast.get_docstring(node) or "", where)


def args_doc(doc: str) -> dict[str, str]:
    """The entries of a Google-style `Args:` section, each on one line.

    Args:
        doc: A docstring (dedented or not).

    Returns:
        Parameter name -> its description (`**kwargs` as `kwargs`); empty without `Args:`.
    """
    lines = inspect.cleandoc(doc).splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return {}
    base = len(lines[start]) - len(lines[start].lstrip())
    found: dict[str, str] = {}
    name, indent = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth <= base:
            break
        entry = re.match(r"\s*\*{0,2}(\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if entry and (indent is None or depth <= indent):
            indent, name = depth, entry[1]
            found[name] = entry[2].strip()
        elif name is not None:
            found[name] = f"{found[name]} {line.strip()}".strip()
    return found


# ---------------------------------------------------------------------------------------
# Reading modules


def _real(module: str) -> bool:
    return module.partition(".")[0] in sys.stdlib_module_names or module in REAL_MODULES


@functools.cache
def _source(module: str) -> Path | None:
    # the file of a module, found without importing it (nor its packages)
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for location in spec.submodule_search_locations or []:
        path = Path(location, *rest)
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


@functools.cache
def _tree(module: str) -> ast.Module | None:
    path = _source(module)
    if path is None:
        return None
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None


def _statements(body: list[ast.stmt]) -> typing.Iterator[ast.stmt]:
    # module-level statements, into if/try/with blocks (where imports often sit)
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.If, ast.Try, ast.With)):
            inner = [*stmt.body, *getattr(stmt, "orelse", [])]
            if isinstance(stmt, ast.Try):
                inner += [s for handler in stmt.handlers for s in handler.body]
                inner += stmt.finalbody
            yield from _statements(inner)


def _absolute(module: str, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    is_package = (_source(module) or Path()).name == "__init__.py"
    parts = module.split(".")
    base = parts[: len(parts) - level + (1 if is_package else 0)]
    return ".".join([*base, name] if name else base)


@functools.cache
def _bindings(module: str) -> dict[str, tuple[str, Any]]:
    # top-level name -> how it is bound; the first binding wins (a try's body, not its
    # fallback; a TYPE_CHECKING import, not a later placeholder)
    tree = _tree(module)
    found: dict[str, tuple[str, Any]] = {}
    for stmt in _statements(tree.body if tree else []):
        entries: list[tuple[str, tuple[str, Any]]] = []
        if isinstance(stmt, ast.Assign):
            entries = [
                (t.id, ("value", stmt.value)) for t in stmt.targets if isinstance(t, ast.Name)
            ]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value and isinstance(stmt.target, ast.Name):
            entries = [(stmt.target.id, ("value", stmt.value))]
        elif isinstance(stmt, ast.ClassDef):
            entries = [(stmt.name, ("class", stmt))]
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            entries = [(stmt.name, ("function", stmt))]
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname:
                    entries.append((alias.asname, ("module", alias.name)))
                else:
                    top = alias.name.partition(".")[0]
                    entries.append((top, ("module", top)))
        elif isinstance(stmt, ast.ImportFrom):
            source = _absolute(module, stmt.level, stmt.module)
            for alias in stmt.names:
                if alias.name != "*":
                    entries.append((alias.asname or alias.name, ("from", (source, alias.name))))
        for name, binding in entries:
            found.setdefault(name, binding)
    return found


_IN_PROGRESS: set[tuple[str, str]] = set()


@functools.cache
def _lookup(module: str, name: str) -> Any:
    """What a module's top-level `name` is, read from its source."""
    if _real(module):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return Any
    key = (module, name)
    if key in _IN_PROGRESS:  # an alias that refers back to itself
        return Any
    _IN_PROGRESS.add(key)
    try:
        how, what = _bindings(module).get(name, (None, None))
        if how == "class":
            return _stand_in(module, name)
        if how == "value":
            return _evaluate(module, what)
        if how == "module":
            return _ModuleName(what)
        if how == "from":
            source, attr = what
            if _source(f"{source}.{attr}") is not None and not _real(source):
                return _ModuleName(f"{source}.{attr}")  # a submodule
            return _lookup(source, attr)
        if how is None and _source(f"{module}.{name}") is not None:
            return _ModuleName(f"{module}.{name}")
        return Any
    finally:
        _IN_PROGRESS.discard(key)


@functools.cache
def _stand_in(module: str, name: str) -> type:
    return type(
        name,
        (),
        {
            "__module__": module,
            "__qualname__": name,
            "__doc__": f"Stands in for {module}.{name}, which checking does not import.",
            "__m3_stands_for__": f"{module}:{name}",
            "__class_getitem__": classmethod(lambda cls, _: cls),
        },
    )


def _class_node(module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
    if depth > 20 or _real(module):
        return None
    how, what = _bindings(module).get(name, (None, None))
    if how == "class":
        return module, what
    if how == "from":
        return _class_node(*what, depth=depth + 1)
    return None


def _default(module: str, node: ast.expr | None) -> Any:
    if node is None:
        return _EMPTY
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = _evaluate(module, node)
        return _EMPTY if value is Any else value


def _hint(module: str, node: ast.expr) -> Any:
    try:
        return _evaluate(module, node)
    except Exception:  # an annotation this reader does not understand: unchecked
        return Any


def _name(module: str, name: str) -> Any:
    if name in _bindings(module):
        return _lookup(module, name)
    return getattr(builtins, name, Any)


def _evaluate(module: str, node: ast.expr, *, literal: bool = False) -> Any:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str) and not literal:  # a forward reference
            try:
                return _evaluate(module, ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                return Any
        return node.value
    if isinstance(node, ast.Name):
        return _name(module, node.id)
    if isinstance(node, ast.Attribute):
        base = _evaluate(module, node.value)
        if isinstance(base, _ModuleName):
            return _lookup(str(base), node.attr)
        if base is Any or is_stand_in(base):
            return Any
        return getattr(base, node.attr, Any)
    if isinstance(node, ast.Subscript):
        base = _evaluate(module, node.value)
        if base is Any or isinstance(base, _ModuleName):
            return Any
        inner = base is typing.Literal or literal
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        values = [_evaluate(module, item, literal=inner) for item in items]
        if base is typing.Annotated:  # the markers are values, not types
            values[1:] = [_evaluate(module, item, literal=True) for item in items[1:]]
        return base[tuple(values) if isinstance(node.slice, ast.Tuple) else values[0]]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _evaluate(module, node.left), _evaluate(module, node.right)
        try:
            return left | right
        except TypeError:
            return typing.Union[left, right]  # noqa: UP007 (for values `|` does not join)
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_evaluate(module, item, literal=literal) for item in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(module, node.operand, literal=True)
    if isinstance(node, ast.Call):
        function = _evaluate(module, node.func)
        if function is Any or is_stand_in(function) or isinstance(function, _ModuleName):
            return Any
        args = [_evaluate(module, a, literal=True) for a in node.args]
        kwargs = {k.arg: _evaluate(module, k.value, literal=True) for k in node.keywords if k.arg}
        return function(*args, **kwargs)
    return Any


def _imported_signature(target: str) -> Signature:
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    parameters = list(inspect.signature(cls).parameters.values())
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:  # an annotation that names something only type checkers import
        hints = {}
    docs = {**args_doc(inspect.getdoc(cls) or ""), **args_doc(cls.__init__.__doc__ or "")}
    arguments = tuple(
        Argument(p.name, p.kind, p.default, docs.get(p.name, ""), hints.get(p.name))
        for p in parameters
    )
    return Signature(target, name, arguments, inspect.getdoc(cls) or "", cls.__module__)
