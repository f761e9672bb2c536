"""The leakage overlap (Eq. 6) against a brute force written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.core.errors import UserError
from m3.retrieval.overlap import exceeds, lcs_length, leak_mask, overlap


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
