"""Small checks and conversions that every layer shares, each written once.

Arguments are checked where they enter m3 and refused with a `UserError` that names the
owner (a class or function), the argument and what was expected:

```python
from m3.core.checks import check_int, check_fraction, check_choice, as_ids, right_pad

bits = check_int("ProductQuantizer", "bits", bits, low=1, high=16)
fraction = check_fraction(None, "eval_fraction", 0.25, open_interval=True)
metric = check_choice("ExactIndex", "metric", metric, ("cosine", "dot"))
ids = as_ids(torch.tensor([3, 1]), where="store")   # (N,) int64 numpy array
idx, lengths = right_pad([[5, 6, 7], [8]], pad=0)    # (2, 3) and (2,) int64 tensors
cls = import_class("m3.backends.exact_index.ExactIndex")
```

Importing this module loads neither numpy nor torch (`m3 --help` stays fast); the
functions that need them import them when called.
"""

from __future__ import annotations

import importlib
import operator
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from m3.core.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

_T = TypeVar("_T")


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def check_int(
    owner: str | None, name: str, value: object, *, low: int | None, high: int | None = None
) -> int:
    """Check that a value is an integer in a range.

    Python and numpy integers pass (anything `operator.index` accepts); bools, floats and
    strings do not, even when they equal an integer.

    Args:
        owner: Who checks, for the message (e.g. `"ProductQuantizer"`); None for none.
        name: The argument's name.
        value: The value given.
        low: Smallest allowed value; None for no bound.
        high: Largest allowed value; None for no bound.

    Returns:
        The value as a Python `int`.

    Raises:
        UserError: For a non-integer or a value out of range, e.g. `"ProductQuantizer: bits
            must be an integer in 1..16, got 17"` or `"max_tokens must be an integer of at
            least 1, got 0"`.
    """
    try:
        number = None if isinstance(value, bool) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        if low is None:
            allowed = "" if high is None else f" of at most {high}"
        else:
            allowed = f" of at least {low}" if high is None else f" in {low}..{high}"
        raise UserError(f"{_prefix(owner)}{name} must be an integer{allowed}, got {value!r}")
    return number


def check_fraction(owner: str | None, name: str, value: object, *, open_interval: bool) -> float:
    """Check that a value is a number between 0 and 1.

    Args:
        owner: Who checks, for the message; None for none.
        name: The argument's name.
        value: The value given (an int or float, not a bool).
        open_interval: True to refuse 0 and 1 themselves.

    Returns:
        The value as a `float`.

    Raises:
        UserError: For a non-number (NaN included) or a value outside the interval, e.g.
            `"eval_fraction must be a number strictly between 0 and 1, got 1.0"`.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and (0 < value < 1 if open_interval else 0 <= value <= 1)  # type: ignore[operator]
    if not inside:
        where = "strictly between 0 and 1" if open_interval else "between 0 and 1"
        raise UserError(f"{_prefix(owner)}{name} must be a number {where}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_choice(owner: str | None, name: str, value: _T, choices: Iterable[object]) -> _T:
    """Check that a value is one of a few allowed ones.

    Args:
        owner: Who checks, for the message; None for none.
        name: The argument's name.
        value: The value given.
        choices: The allowed values, listed in this order by the message.

    Returns:
        The value.

    Raises:
        UserError: For any other value, e.g. `"ExactIndex: metric must be one of ['cosine',
            'dot'], got 'l2'"`.
    """
    allowed = list(choices)
    if value not in allowed:
        raise UserError(f"{_prefix(owner)}{name} must be one of {allowed}, got {value!r}")
    return value


def as_ids(
    ids: Tensor | np.ndarray | Sequence[int], *, where: str, what: str = "ids"
) -> np.ndarray:
    """Turn 1-D integer ids (a tensor, an array or a sequence) into an int64 numpy array.

    A 1-D int64 CPU tensor, the usual case on every read, is returned as a view without
    any copy or check of its values. Empty input of any dtype gives an empty array.

    Args:
        ids: `(N,)` integer ids.
        where: Who asks (a store's path, an index method), for the message.
        what: What the ids are, for the message (e.g. `"reference ids"`).

    Returns:
        `(N,)` int64 array (a view of a CPU tensor or array when no conversion is needed).

    Raises:
        UserError: For ids that are not integers (floats, bools, strings) or not 1-D.
    """
    import numpy as np

    torch = sys.modules.get("torch")  # when torch was never imported, ids are no tensor
    if torch is not None and isinstance(ids, torch.Tensor):
        if ids.dtype == torch.int64 and ids.dim() == 1 and ids.is_cpu:
            return ids.numpy()
        if ids.numel() == 0:
            return np.zeros(0, dtype=np.int64)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise UserError(f"{where}: {what} must be integers, got a {ids.dtype} tensor")
        if ids.dim() != 1:
            raise UserError(f"{where}: {what} must be 1-D, got shape {tuple(ids.shape)}")
        return ids.detach().cpu().numpy().astype(np.int64, copy=False)
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise UserError(f"{where}: {what} must be integers, got {array.ravel()[:5].tolist()!r}")
    if array.ndim != 1:
        raise UserError(f"{where}: {what} must be 1-D, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Stack rows of token ids of different lengths into one right-padded tensor.

    Args:
        rows: `N` rows of integer ids (lists, tuples, tensors or arrays).
        pad: The id that fills each row after its end.

    Returns:
        `(N, T)` int64 ids, `T` the longest row's length (0 for no rows or only empty ones),
        and `(N,)` int64 lengths.
    """
    import torch

    lengths = [len(row) for row in rows]
    out = torch.full((len(rows), max(lengths, default=0)), pad, dtype=torch.long)
    for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        if length:
            out[i, :length] = torch.as_tensor(row, dtype=torch.long)
    return out, torch.tensor(lengths, dtype=torch.long)


def import_module(name: str) -> Any:
    """Import a module by name, turning any failure into a clear `UserError`.

    Args:
        name: A dotted module name, e.g. `my_lab.tokenizers`.

    Returns:
        The module.

    Raises:
        UserError: When it cannot be found (with a hint where to put it) or fails while
            importing (naming the error).
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
        raise UserError(f"cannot import {name!r}: no module named {missing!r}{hint}") from err
    except Exception as err:  # the user's module failed while importing: say how
        raise UserError(f"importing {name!r} failed: {type(err).__name__}: {err}") from err


def import_class(path: str, *, moved: Mapping[str, str] | None = None) -> Any:
    """What a dotted path `module.Name` names, imported (a class, usually).

    Args:
        path: E.g. `"m3.backends.exact_index.ExactIndex"`, as files record classes.
        moved: Old module name -> the module that now holds its names, for paths that
            files written by an earlier m3 record: they resolve there directly, without
            importing the old path (and its `DeprecationWarning`).

    Returns:
        The object.

    Raises:
        UserError: For a path without a module, a module that cannot be imported, or one
            without that name.
    """
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise UserError(f"{path!r} is not a dotted path module.Name")
    module_name = (moved or {}).get(module_name, module_name)
    module = import_module(module_name)
    if not hasattr(module, name):
        raise UserError(f"module {module_name!r} has no attribute {name!r}")
    return getattr(module, name)
