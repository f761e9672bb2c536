"""The leakage filter's overlap (the paper's Eq. 6), computed fast.

A retrieved reference `r` is dropped when it overlaps the query text `t` too much (training:
threshold 0.9 against the training sequence; evaluation: 2/3)::

    overlap(t, r) = max_i LCS(r, t[i : i + 2|r|]) / |r|

the longest common subsequence (not substring) of the reference and any window of the text
spanning at most 2|r| positions, as a fraction of the reference's length. Both are token id
sequences. An empty reference has overlap 0.0 (it cannot leak anything).

```python
overlap(text_ids, reference_ids)                     # float in [0, 1]
exceeds(text_ids, reference_ids, 0.9)                # bool, stops as soon as it is decided
leak_mask(sequence_ids, retrieved_references, 0.9)   # (R,) bool tensor, True = drop
```

How it stays fast (the textbook way, a DP LCS for every window, costs
`O(|t| · |r| · 2|r|)` Python steps: ~10⁸ for a 2048-token sequence):

- **Lengths first**: the LCS is at most the shorter length, so a text shorter than
  `threshold · |r|` never leaks — a 64-token chunk can overlap a 128-token reference by at
  most 0.5, below both paper thresholds.
- **Bit-parallel LCS** (Allison–Dix / Hyyrö): the LCS of `r` against a growing text is kept
  in the zero bits of one `|r|`-bit Python int, updated by three big-int operations per text
  token that occurs in `r`; tokens absent from `r` cost one dict lookup.
- **Only windows that start on a token of `r`**: a window starting on any other token is
  contained, for LCS purposes, in the window one position later.
- **An upper bound for every window at once**: `Σ_token min(count in r, count in window)`
  bounds the LCS. It is computed for all window starts in a few numpy passes (each
  occurrence of a token counts for an interval of starts), then windows are tried best
  bound first, stopping once no remaining bound can beat (or, for `exceeds`, reach) what is
  needed. Unrelated text is usually decided without computing a single LCS.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m3.core.errors import UserError

TokenIds = Sequence[int] | Tensor | np.ndarray


def _as_list(ids: Any, name: str) -> list[int]:
    tolist = getattr(ids, "tolist", None)
    values = tolist() if callable(tolist) else ids
    if isinstance(values, int) or not isinstance(values, Sequence):
        raise UserError(f"{name} must be a 1-D sequence of token ids, got {type(ids).__name__}")
    if values and not isinstance(values[0], int):
        raise UserError(f"{name} must be a 1-D sequence of int token ids, got {values[0]!r}")
    return list(values)


def _masks(pattern: Sequence[int]) -> dict[int, int]:
    """Bit j of `masks[token]` is set where `pattern[j] == token`."""
    masks: dict[int, int] = {}
    for j, token in enumerate(pattern):
        masks[token] = masks.get(token, 0) | (1 << j)
    return masks


def _lcs_bits(masks: dict[int, int], length: int, text: Sequence[int]) -> int:
    """LCS of the pattern that `masks` describes (`length` tokens) and `text`."""
    # Zero bits of v mark the pattern positions matched so far. The low `length` bits of a
    # sum or difference depend only on the low bits of its operands, so v may carry garbage
    # above them; it is masked once at the end.
    v = (1 << length) - 1
    get = masks.get
    for token in text:
        u = get(token)
        if u:
            u &= v
            v = (v + u) | (v - u)
    return length - (v & ((1 << length) - 1)).bit_count()


def lcs_length(a: TokenIds, b: TokenIds) -> int:
    """Length of the longest common subsequence of two token id sequences.

    Args:
        a: `(La,)` token ids.
        b: `(Lb,)` token ids.

    Returns:
        The LCS length, in `[0, min(La, Lb)]`.
    """
    x, y = _as_list(a, "a"), _as_list(b, "b")
    if len(x) < len(y):  # one step per token of the shorter one
        x, y = y, x
    return _lcs_bits(_masks(x), len(x), y) if y else 0


def _window_bounds(text: np.ndarray, reference: Sequence[int], width: int) -> np.ndarray:
    """`Σ_token min(count in reference, count in text[i : i + width])` for each start i.

    Args:
        text: `(n,)` int64 token ids, `n > width`.
        reference: The reference's token ids.
        width: Window length.

    Returns:
        `(n − width + 1,)` int64 upper bounds of the windows' LCS with the reference.
    """
    starts = text.size - width + 1
    counts = Counter(reference)
    tokens = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    order = np.argsort(tokens)
    tokens, caps = tokens[order], np.fromiter(counts.values(), np.int64, len(counts))[order]
    slot = np.minimum(np.searchsorted(tokens, text), tokens.size - 1)
    positions = np.nonzero(tokens[slot] == text)[0]
    if positions.size == 0:
        return np.zeros(starts, dtype=np.int64)
    group = slot[positions]
    by_group = np.argsort(group, kind="stable")  # occurrences of each token, in text order
    group, positions = group[by_group], positions[by_group]
    index = np.arange(group.size)
    rank = index - np.searchsorted(group, group, side="left")
    cap = caps[group]
    # Occurrence `rank` of a token counts in window i when it lies in the window and fewer
    # than `cap` earlier occurrences do, i.e. when occurrence `rank − cap` lies before i.
    earlier = np.where(rank >= cap, positions[np.maximum(index - cap, 0)], -1)
    low = np.maximum(positions - width + 1, earlier + 1)
    high = np.minimum(positions, starts - 1)
    keep = low <= high
    low, high = low[keep], high[keep]
    diff = np.bincount(low, minlength=starts + 1) - np.bincount(high + 1, minlength=starts + 1)
    return np.cumsum(diff[:starts])


def _max_window_lcs(
    text: list[int], text_np: np.ndarray | None, reference: list[int], need: int | None
) -> int:
    """Max over windows of LCS(reference, window), exact when `need` is None.

    With `need`, the search stops as soon as the answer is known to be ≥ `need` or < `need`,
    and the value returned is then only correct on that side of `need`.
    """
    length, width = len(reference), 2 * len(reference)
    if length == 0 or not text:
        return 0
    if len(text) <= width:  # one window: the whole text
        if need is not None and sum((Counter(text) & Counter(reference)).values()) < need:
            return 0
        if len(text) < length:
            return _lcs_bits(_masks(reference), length, text)
        return _lcs_bits(_masks(text), len(text), reference)
    if text_np is None:
        text_np = np.asarray(text, dtype=np.int64)
    masks = _masks(reference)
    # Every window is a subsequence of the text: one pass over the whole text bounds them all.
    whole = _lcs_bits(masks, length, text)
    if need is not None and whole < need:
        return whole
    bounds = np.minimum(_window_bounds(text_np, reference, width), whole)
    last = bounds.size - 1
    # Candidate starts: on a token of the reference, plus the last full window.
    on_token = np.fromiter((t in masks for t in text[:last]), dtype=bool, count=last)
    candidates = np.append(np.nonzero(on_token)[0], last)
    candidates = candidates[np.argsort(-bounds[candidates], kind="stable")]
    best = 0
    floor = 0 if need is None else need - 1  # a bound ≤ floor cannot change the decision
    for start in candidates.tolist():
        if bounds[start] <= max(best, floor):
            break
        best = max(best, _lcs_bits(masks, length, text[start : start + width]))
        if need is not None and best >= need:
            break
    return best


def overlap(text_ids: TokenIds, reference_ids: TokenIds) -> float:
    """Eq. 6: the largest LCS of the reference with a window of ≤ 2|r| text tokens, over |r|.

    Args:
        text_ids: `(T,)` token ids of the query text (or training sequence).
        reference_ids: `(R,)` token ids of the retrieved reference.

    Returns:
        The overlap in `[0, 1]`; 0.0 when the reference (or the text) is empty.
    """
    text = _as_list(text_ids, "text_ids")
    reference = _as_list(reference_ids, "reference_ids")
    if not reference:
        return 0.0
    return _max_window_lcs(text, None, reference, None) / len(reference)


def _needed(threshold: float, length: int) -> int:
    """Smallest LCS N with `N / length > threshold`, compared exactly as `overlap` divides."""
    need = max(0, min(length + 1, math.floor(threshold * length)))
    while need > 0 and (need - 1) / length > threshold:
        need -= 1
    while need <= length and need / length <= threshold:
        need += 1
    return need


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise UserError(f"threshold must be a number, got {threshold!r}")
    if math.isnan(threshold):
        raise UserError("threshold must be a number, got NaN")
    return float(threshold)


def _exceeds(text: list[int], text_np: np.ndarray | None, reference: list[int], t: float) -> bool:
    if not reference:
        return t < 0.0
    need = _needed(t, len(reference))
    if need > min(len(text), len(reference)):  # the LCS cannot be longer than either
        return False
    if need == 0:
        return True
    return _max_window_lcs(text, text_np, reference, need) >= need


def exceeds(text_ids: TokenIds, reference_ids: TokenIds, threshold: float) -> bool:
    """Whether `overlap(text_ids, reference_ids) > threshold`, decided with early exits.

    Args:
        text_ids: `(T,)` token ids of the query text.
        reference_ids: `(R,)` token ids of the reference.
        threshold: The leakage threshold (the paper: 0.9 in training, 2/3 in evaluation).

    Returns:
        True when the reference leaks the text and must be dropped.
    """
    threshold = _check_threshold(threshold)
    text = _as_list(text_ids, "text_ids")
    return _exceeds(text, None, _as_list(reference_ids, "reference_ids"), threshold)


def leak_mask(text_ids: TokenIds, references: Sequence[TokenIds], threshold: float) -> Tensor:
    """Which of many references overlap one text by more than `threshold`.

    The shape of both filters in Memory³: a training sequence against the reference each of
    its 32 chunks retrieved, or an evaluation chunk against its 5+ retrieved references.
    The text is converted once for all references.

    Args:
        text_ids: `(T,)` token ids of the text.
        references: R references, each `(L_r,)` token ids (lengths may differ).
        threshold: The leakage threshold.

    Returns:
        `(R,)` bool tensor, True where the reference must be dropped.
    """
    threshold = _check_threshold(threshold)
    text = _as_list(text_ids, "text_ids")
    text_np = np.asarray(text, dtype=np.int64)
    flags = [
        _exceeds(text, text_np, _as_list(reference, f"references[{i}]"), threshold)
        for i, reference in enumerate(references)
    ]
    return torch.tensor(flags, dtype=torch.bool)
