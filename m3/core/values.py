"""Checking a recipe's plain values against type annotations, and the problems found.

A component's constructor annotations are its schema: `check_value` holds a value from YAML
to an annotation (`int`, `float | None`, `Literal[...]`, `list[str]`, ...), `Bounds` and
`InputPath` add ranges and files that must exist, and every mismatch becomes a `Problem`
with its key path, so that all of a recipe's problems are reported at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
import typing
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin


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
