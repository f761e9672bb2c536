"""The leakage overlap (Eq. 6) against a brute force written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.core.errors import UserError
from m3.retrieval.overlap import (
    _baseline_leak_mask,
    _baseline_overlap,
    exceeds,
    lcs_length,
    leak_mask,
    overlap,
)


def dp_lcs(a: list[int], b: list[int]) -> int:
    """Textbook dynamic-programming LCS."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def brute_overlap(text: list[int], reference: list[int]) -> float:
    """Every window of 2|r| text positions (shorter ones lie inside them), every LCS by DP."""
    if not reference:
        return 0.0
    width = 2 * len(reference)
    best = max((dp_lcs(reference, text[i : i + width]) for i in range(len(text))), default=0)
    return best / len(reference)


tokens = st.integers(min_value=0, max_value=5)  # few distinct tokens: many repeats
texts = st.lists(tokens, max_size=40)
references = st.lists(tokens, max_size=9)


@st.composite
def near_copies(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """A reference cut from the text, then edited: overlaps land near the thresholds."""
    text = draw(st.lists(st.integers(0, 30), min_size=1, max_size=60))
    start = draw(st.integers(0, len(text) - 1))
    reference = text[start : start + draw(st.integers(1, 12))]
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(reference)))
        if draw(st.booleans()):
            reference = [*reference[:position], draw(st.integers(0, 30)), *reference[position:]]
        else:
            reference = reference[:position] + reference[position + 1 :]
    return text, reference


@settings(max_examples=300, deadline=None)
@given(texts, references)
def test_overlap_equals_brute_force(text: list[int], reference: list[int]) -> None:
    expected = brute_overlap(text, reference)
    assert overlap(text, reference) == expected
    for threshold in (2 / 3, 0.9):
        assert exceeds(text, reference, threshold) == (expected > threshold)


@settings(max_examples=300, deadline=None)
@given(near_copies())
def test_near_copies_against_brute_force(pair: tuple[list[int], list[int]]) -> None:
    text, reference = pair
    expected = brute_overlap(text, reference)
    assert overlap(text, reference) == expected
    for threshold in (2 / 3, 0.9, 0.5):
        assert exceeds(text, reference, threshold) == (expected > threshold)


@settings(max_examples=100, deadline=None)
@given(texts, st.lists(references, max_size=6))
def test_leak_mask_filters_each_reference(text: list[int], refs: list[list[int]]) -> None:
    mask = leak_mask(torch.tensor(text, dtype=torch.int64), refs, 2 / 3)
    assert mask.dtype == torch.bool and mask.shape == (len(refs),)
    assert mask.tolist() == [brute_overlap(text, r) > 2 / 3 for r in refs]


@settings(max_examples=200, deadline=None)
@given(st.lists(tokens, max_size=30), st.lists(tokens, max_size=30))
def test_lcs_length_equals_dp(a: list[int], b: list[int]) -> None:
    assert lcs_length(a, b) == dp_lcs(a, b)


def test_window_spans_at_most_twice_the_reference() -> None:
    # Both tokens occur in the text, but never within 2|r| = 4 positions of each other.
    assert overlap([1, 0, 0, 0, 2], [1, 2]) == 0.5
    assert overlap([1, 0, 0, 2], [1, 2]) == 1.0


def test_edge_cases() -> None:
    assert overlap([1, 2, 3], []) == 0.0  # an empty reference leaks nothing
    assert not exceeds([1, 2, 3], [], 2 / 3)
    assert overlap([], [1, 2]) == 0.0
    assert overlap([5, 6], [5, 6, 7, 8]) == 0.5  # text shorter than 2|r|
    assert overlap([7] * 10, [7, 7, 7]) == 1.0  # repeated tokens
    assert overlap(np.array([3, 1, 2]), torch.tensor([1, 2])) == 1.0


def test_threshold_is_strict() -> None:
    # overlap exactly at the threshold does not exceed it (the paper: "exceeds")
    assert overlap([1, 2, 9], [1, 2, 3]) == 2 / 3
    assert not exceeds([1, 2, 9], [1, 2, 3], 2 / 3)
    reference = list(range(10))
    text = [*reference[:9], 99]
    assert overlap(text, reference) == 0.9 and not exceeds(text, reference, 0.9)
    assert exceeds(text, reference, math.nextafter(0.9, 0))


def test_long_text_finds_the_leaking_window() -> None:
    rng = np.random.default_rng(0)
    text = rng.integers(0, 5000, 2048).tolist()
    reference = text[1000:1128]
    edited = reference[:60] + [9999] * 10 + reference[70:]  # 118 of 128 tokens in order
    assert overlap(text, reference) == 1.0
    assert overlap(text, edited) == 118 / 128
    assert exceeds(text, edited, 0.9) and not exceeds(text, edited, 0.95)
    unrelated = rng.integers(5000, 6000, 128).tolist()
    assert overlap(text, unrelated) == 0.0
    assert leak_mask(text, [reference, edited, unrelated], 0.9).tolist() == [True, True, False]


def test_bad_input_is_a_user_error() -> None:
    with pytest.raises(UserError, match="threshold"):
        exceeds([1], [1], float("nan"))
    with pytest.raises(UserError, match="reference_ids"):
        overlap([1, 2], 3)
    with pytest.raises(UserError, match="text_ids"):
        overlap([[1, 2]], [1])


# ------------------------------------------- the lane passes against the previous implementation


def window_brute_force(text: list[int], reference: list[int]) -> int:
    """Max over windows of 2|r| text positions of the (DP-tested) bit-parallel LCS."""
    width = 2 * len(reference)
    return max((lcs_length(reference, text[i : i + width]) for i in range(len(text))), default=0)


@st.composite
def long_cases(draw: st.DrawFn) -> tuple[list[int], list[list[int]]]:
    """A text of up to 400 tokens over a small or large alphabet and up to 6 references.

    References are random, cut from the text and edited (so that overlaps land near the
    thresholds), or runs of one repeated token; lengths 0..150 span one to three 64-bit
    words per lane.
    """
    alphabet = draw(st.sampled_from([1, 2, 4, 27, 1000]))
    symbol = st.integers(0, alphabet - 1)
    text = draw(st.lists(symbol, max_size=400))
    refs = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["random", "cut", "cut", "repeat"]))
        if kind == "random" or not text:
            ref = draw(st.lists(symbol, max_size=150))
        elif kind == "repeat":
            ref = [draw(symbol)] * draw(st.integers(0, 150))
        else:
            start = draw(st.integers(0, len(text) - 1))
            ref = text[start : start + draw(st.integers(1, 150))]
            for _ in range(draw(st.integers(0, 12))):
                position = draw(st.integers(0, len(ref)))
                if draw(st.booleans()):
                    ref = [*ref[:position], draw(symbol), *ref[position:]]
                else:
                    ref = ref[:position] + ref[position + 1 :]
        refs.append(ref)
    return text, refs


@settings(max_examples=80, deadline=None)
@given(long_cases(), st.sampled_from([2 / 3, 0.9, 0.5, 0.0, 0.95]))
def test_lane_passes_equal_the_previous_implementation(
    case: tuple[list[int], list[list[int]]], threshold: float
) -> None:
    text, refs = case
    values = [window_brute_force(text, r) for r in refs]
    for ref, value in zip(refs, values, strict=True):
        expected = value / len(ref) if ref else 0.0
        assert overlap(text, ref) == expected == _baseline_overlap(text, ref)
    # all references in one call (shared lane passes) and each one alone agree
    mask = leak_mask(text, refs, threshold).tolist()
    assert mask == _baseline_leak_mask(text, refs, threshold).tolist()
    assert mask == [bool(r) and v / len(r) > threshold for r, v in zip(refs, values, strict=True)]
    assert mask == [exceeds(text, r, threshold) for r in refs]


@settings(max_examples=60, deadline=None)
@given(long_cases())
def test_thresholds_at_the_overlap_itself(case: tuple[list[int], list[list[int]]]) -> None:
    # the decision flips exactly at the overlap: not above it, just below it
    text, refs = case
    for ref in refs:
        if not ref:
            assert not exceeds(text, ref, 0.0) and exceeds(text, ref, -1e-9)
            continue
        value = overlap(text, ref)
        assert not exceeds(text, ref, value)
        assert exceeds(text, ref, math.nextafter(value, -math.inf))
        for k in range(len(ref) + 1):  # every LCS length the reference allows
            assert exceeds(text, ref, k / len(ref)) == (value > k / len(ref))


def test_lane_edge_cases() -> None:
    long = list(range(300))
    assert leak_mask([], [[1], [], long], 0.5).tolist() == [False, False, False]
    assert leak_mask(long, [], 0.5).shape == (0,)
    assert leak_mask(long, [[], long[10:140], [7] * 5, long[::-1][:70]], 0.9).tolist() == [
        False,
        True,
        False,
        False,
    ]
    assert overlap([5] * 1000, [5] * 130) == 1.0  # repeated tokens, a three-word lane
    mixed = [5] * 300 + [6] * 300  # the 6s come too late for a window holding 128 5s
    assert overlap(mixed, [6] * 64 + [5] * 128) == 128 / 192
    assert overlap(long, long[:64]) == 1.0  # 64 tokens: the lane's spare bit in a 2nd word
    assert overlap(long, long[:63]) == 1.0
    assert not exceeds(long, [*long[:63], -1], 63 / 64) and exceeds(long, long[:64], 63 / 64)
