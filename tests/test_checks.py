"""The checks every layer shares (m3.core.checks) and the backends' own (m3.backends.checks).

Properties over generated inputs: what passes comes back unchanged in the promised type,
what does not is a `UserError` naming the owner and the argument.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.backends.checks import as_index_ids, as_reference_ids, check_dim, check_k, check_metric
from m3.core.checks import (
    as_ids,
    check_choice,
    check_fraction,
    check_int,
    import_class,
    right_pad,
)
from m3.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
INT64 = st.integers(-(2**63), 2**63 - 1)
NOT_INTEGERS = st.one_of(
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


# --------------------------------------------------------------------------------- check_int
@settings(max_examples=100, deadline=None)
@given(
    value=st.integers(-1000, 1000),
    low=st.none() | st.integers(-1000, 1000),
    high=st.none() | st.integers(-1000, 1000),
)
def test_check_int_passes_integers_in_range_and_refuses_the_others(value, low, high):
    inside = (low is None or value >= low) and (high is None or value <= high)
    if inside:
        got = check_int("Owner", "size", value, low=low, high=high)
        assert got == value and type(got) is int
        numpy_value = check_int("Owner", "size", np.int32(value), low=low, high=high)
        assert numpy_value == value and type(numpy_value) is int
    else:
        with pytest.raises(UserError, match=rf"^Owner: size must be an integer.*got {value}$"):
            check_int("Owner", "size", value, low=low, high=high)


@settings(max_examples=50, deadline=None)
@given(value=NOT_INTEGERS)
def test_check_int_refuses_what_is_not_an_integer(value):
    with pytest.raises(UserError, match="n_people must be an integer of at least 2"):
        check_int(None, "n_people", value, low=2)


def test_check_int_messages():
    # the wording the recipes' problems and the chunkers' errors have always had
    with pytest.raises(UserError) as error:
        check_int(None, "max_tokens", 0, low=1)
    assert str(error.value) == "max_tokens must be an integer of at least 1, got 0"
    with pytest.raises(UserError) as error:
        check_int("pack_codes", "bits", 17, low=1, high=16)
    assert str(error.value) == "pack_codes: bits must be an integer in 1..16, got 17"
    with pytest.raises(UserError) as error:
        check_int("ScannIndex", "brute_force_below", 1.5, low=None)
    assert str(error.value) == "ScannIndex: brute_force_below must be an integer, got 1.5"


# ---------------------------------------------------------------------- fractions and choices
@settings(max_examples=100, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 2))
def test_check_fraction_keeps_the_interval(value):
    for open_interval in (False, True):
        inside = 0 < value < 1 if open_interval else 0 <= value <= 1
        if inside:
            got = check_fraction(None, "eval_fraction", value, open_interval=open_interval)
            assert got == value and type(got) is float
        else:
            with pytest.raises(UserError, match="eval_fraction must be a number"):
                check_fraction(None, "eval_fraction", value, open_interval=open_interval)
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        check_fraction(None, "eval_fraction", True, open_interval=True)


def test_check_choice_lists_the_choices_in_order():
    assert check_choice("ExactIndex", "metric", "dot", ("cosine", "dot")) == "dot"
    with pytest.raises(UserError) as error:
        check_choice("ExactIndex", "metric", "l2", ("cosine", "dot"))
    assert str(error.value) == "ExactIndex: metric must be one of ['cosine', 'dot'], got 'l2'"
    assert check_metric("cosine", where="MyIndex") == "cosine"
    with pytest.raises(UserError, match="MyIndex: metric"):
        check_metric("l2", where="MyIndex")
    with pytest.raises(UserError, match="MyIndex: dim"):
        check_dim(0, where="MyIndex")
    with pytest.raises(UserError, match="MyIndex: k"):
        check_k(True, where="MyIndex")


# ------------------------------------------------------------------------------------ as_ids
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32]
TORCH_INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(0, 127), max_size=20), kind=st.integers(0, 12))
def test_as_ids_gives_the_same_ids_as_int64_from_any_integer_container(values, kind):
    if kind < len(INT_DTYPES):
        ids = np.array(values, dtype=INT_DTYPES[kind])
    elif kind < len(INT_DTYPES) + len(TORCH_INTS):
        ids = torch.tensor(values, dtype=TORCH_INTS[kind - len(INT_DTYPES)])
    else:
        ids = tuple(values)
    got = as_ids(ids, where="store")
    assert got.dtype == np.int64 and got.ndim == 1
    assert got.tolist() == values


@settings(max_examples=50, deadline=None)
@given(values=st.lists(INT64, max_size=20))
def test_as_ids_keeps_every_int64(values):
    assert as_ids(values, where="store").tolist() == values
    tensor = torch.tensor(values, dtype=torch.int64)
    got = as_ids(tensor, where="store")
    assert got.tolist() == values
    if values:  # the usual read: a view of the tensor, no copy
        assert np.shares_memory(got, tensor.numpy())


@pytest.mark.parametrize(
    "ids",
    [
        [1.0, 2.0],
        np.array([0.5]),
        torch.tensor([1.0]),
        torch.tensor([True]),
        [True, False],
        ["a"],
        np.array([[1, 2]]),
        torch.tensor([[1, 2]]),
        torch.tensor(3),
    ],
    ids=repr,
)
def test_as_ids_refuses_non_integers_and_other_shapes(ids):
    with pytest.raises(UserError, match=r"^here: reference ids must be (integers|1-D)"):
        as_ids(ids, where="here", what="reference ids")
    with pytest.raises(UserError, match=r"^bank\.h5: reference ids must be"):
        as_reference_ids(ids, where="bank.h5")


def test_as_ids_of_nothing_is_an_empty_int64_array():
    for empty in ([], (), np.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long)):
        got = as_ids(empty, where="store")
        assert got.dtype == np.int64 and got.shape == (0,)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.integers(-3, 50), max_size=12), count=st.integers(-1, 12))
def test_index_ids_are_distinct_non_negative_and_as_many_as_asked(values, count):
    ok = (
        (count < 0 or count == len(values))
        and all(v >= 0 for v in values)
        and len(set(values)) == len(values)
    )
    if ok:
        assert as_index_ids(torch.tensor(values, dtype=torch.long), count, where="I").tolist() == (
            values
        )
    else:
        with pytest.raises(UserError, match=r"^I: "):
            as_index_ids(values, count, where="I")


# --------------------------------------------------------------------------------- right_pad
@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 1000), max_size=9), max_size=6),
    pad=st.integers(-1, 5),
    as_tensors=st.booleans(),
)
def test_right_pad_keeps_each_row_and_pads_after_it(rows, pad, as_tensors):
    given_rows = [torch.tensor(r, dtype=torch.long) for r in rows] if as_tensors else rows
    idx, lengths = right_pad(given_rows, pad)
    width = max((len(r) for r in rows), default=0)
    assert idx.dtype == lengths.dtype == torch.long
    assert idx.shape == (len(rows), width) and lengths.tolist() == [len(r) for r in rows]
    for i, row in enumerate(rows):
        assert idx[i, : len(row)].tolist() == row
        assert (idx[i, len(row) :] == pad).all()


# ------------------------------------------------------------------------------ import_class
def test_import_class_finds_a_class_by_its_dotted_path():
    assert import_class("m3.core.errors.UserError") is UserError
    with pytest.raises(UserError, match="not a dotted path"):
        import_class("UserError")
    with pytest.raises(UserError, match=r"no module named 'm3\.nowhere'"):
        import_class("m3.nowhere.Thing")
    with pytest.raises(UserError, match="has no attribute 'Nothing'"):
        import_class("m3.core.errors.Nothing")


def test_import_class_reads_moved_modules_where_they_are_now():
    # a path an older m3 recorded resolves at the module's new place without importing the
    # old path (whose alias warns): in a fresh interpreter, so no earlier import hides it
    script = """if True:
        import sys
        from m3.core.checks import import_class
        from m3.core.lazy import MOVED_MODULES
        cls = import_class("m3.errors.UserError", moved=MOVED_MODULES)
        assert cls.__module__ == "m3.core.errors" and "m3.errors" not in sys.modules
    """
    subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", script], check=True, cwd=ROOT
    )


def test_importing_the_checks_loads_neither_numpy_nor_torch():
    script = "import sys, m3.core.checks; assert not {'numpy', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
