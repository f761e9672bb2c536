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
`O(|t| · |r| · 2|r|)` Python steps: ~10⁸ for a 2048-token text and a 128-token reference):

- **Lengths first**: the LCS is at most the shorter length, so a text shorter than
  `threshold · |r|` never leaks — a 64-token chunk can overlap a 128-token reference by at
  most 0.5, below both paper thresholds.
- **Bit-parallel LCS** (Allison–Dix / Hyyrö): the LCS of a pattern against a growing text
  is kept in the zero bits of a bit vector over the pattern, updated by a few bit
  operations per text token; the zeros among its first `k` bits are the LCS of the
  pattern's first `k` tokens.
- **Many LCS in one pass ("lanes")**: the vectors of many (pattern, text) pairs sit side by
  side in one Python int, each lane followed by a zero spare bit that stops carries from
  reaching the next lane. One loop step updates all of them with five big-int operations.
- **Only windows that start on a token of `r`** (plus the last full one): a window
  starting on any other token has no larger an LCS than the window one position later.
- **Bounds for all windows at once**, cheapest first. The token counts of the whole text
  (`Σ_token min(count in r, count in text)`, one `bincount` for all the references of a
  call). The token counts of each window (a few numpy passes). And the LCS of `r` with the
  prefix of a *tile* that ends where the window ends: the text is cut twice into tiles of
  `4|r|` tokens (from 0 and from `2|r|`), every window lying in a tile that starts at most
  `2|r| − 1` before it; the tiles are the lanes, and one pass with the reference's tokens
  as the steps (`|r|` steps on `~2|t|` bits) gives the LCS of every prefix of every tile.
  Token counts prune on large alphabets (BPE), tiles on small ones (bytes); the likelier
  runs first.
- **Refinement of what remains**: lane passes over text segments, one lane per
  (reference, segment). The first computes exactly the four windows with the best bounds
  (a leaking reference is usually found there); the next group the remaining starts by
  `|r|/2` into one segment each, whose LCS bounds all its windows, then four times finer,
  down to single windows, whose LCS is exact.

On text that does not quote the reference, the bounds decide: a reference costs `|r|`
Python steps on `~2|t|`-bit ints plus a few numpy passes over the text — against
`|t| · 2|r|` steps for trying every window.

The exact `overlap` value uses the same passes with a floor that rises to the best window
found so far. The results are exactly those of the definition (the tests compare both with
a brute force, and with the previous, per-window implementation kept here as
`_baseline_leak_mask`: `benchmarks/retrieval_latency.py` times the two side by side).
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


#: Most uint64 words of masks a lane pass gathers at once (16 MiB); more lanes take turns.
_PASS_WORDS = 1 << 21
_ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


class _Lanes:
    """Bit masks of several references, laid out to gather one lane per (reference, segment).

    Attributes:
        text: `(n,)` int64 token ids.
        lengths: `(R,)` the references' lengths.
        words: uint64 words per lane: room for the longest reference and a spare top bit.
        slots: `(R, n + 1)` the row of `table` holding reference ρ's mask of `text[p]`;
            row 0 (a token absent from the reference, and the padding column `n`) is zero.
        rows: Per reference, the `table` row of each of its tokens, `(L_r,)`.
        first_row: `(R + 1,)` reference ρ's distinct tokens have rows
            `first_row[ρ] … first_row[ρ + 1] − 1`.
    """

    def __init__(self, text: np.ndarray, references: Sequence[Sequence[int]]) -> None:
        self.text = text
        self.lengths = np.array([len(r) for r in references], dtype=np.int64)
        self.words = (int(self.lengths.max()) + 1 + 63) // 64
        tokens = np.concatenate([np.asarray(r, dtype=np.int64) for r in references])
        owner = np.repeat(np.arange(len(references)), self.lengths)
        vocabulary, index = np.unique(tokens, return_inverse=True)
        # one table row per distinct (reference, token), ordered by reference then token
        pairs, row = np.unique(owner * vocabulary.size + index, return_inverse=True)
        self.rows = np.split(row + 1, np.cumsum(self.lengths)[:-1])
        self.first_row = 1 + np.searchsorted(
            pairs // vocabulary.size, np.arange(len(references) + 1)
        )
        row_of = np.zeros((len(references), vocabulary.size), dtype=np.int64)
        row_of.flat[pairs] = np.arange(1, pairs.size + 1)
        at = np.minimum(np.searchsorted(vocabulary, text), vocabulary.size - 1)
        self.slots = np.zeros((len(references), text.size + 1), dtype=np.int64)
        self.slots[:, : text.size] = np.where(vocabulary[at] == text, row_of[:, at], 0)
        self._table: np.ndarray | None = None

    @property
    def table(self) -> np.ndarray:
        """`(rows, words)` uint64: the bit mask of each (reference, token); row 0 is zero."""
        if self._table is None:
            table = np.zeros((int(self.first_row[-1]), self.words), dtype=np.uint64)
            for rows in self.rows:
                j = np.arange(rows.size)
                bit = np.left_shift(np.uint64(1), (j % 64).astype(np.uint64))
                np.bitwise_or.at(table, (rows, j // 64), bit)
            self._table = table
        return self._table

    def count_bounds(self) -> np.ndarray:
        """`(R,)` `Σ_token min(count in reference, count in text)`: bounds of the LCS."""
        size = int(self.first_row[-1])
        text = np.bincount(self.slots[:, : self.text.size].ravel(), minlength=size)
        reference = np.bincount(np.concatenate(self.rows), minlength=size)
        common = np.concatenate([[0], np.cumsum(np.minimum(text, reference)[1:])])
        return common[self.first_row[1:] - 1] - common[self.first_row[:-1] - 1]

    def on_token(self, rho: int) -> np.ndarray:
        """`(n,)` bool: where the text holds a token of reference ρ."""
        return self.slots[rho, : self.text.size] > 0

    def tiled_bounds(self, rho: int, reference: Sequence[int]) -> np.ndarray:
        """`LCS(reference, text[a : i + 2|r|])` for each start i, `a` the tile start before i.

        The text is cut into tiles of `2·2|r|` tokens twice, from position 0 and from
        position `2|r|`, so that every window lies in a tile that starts at most `2|r| − 1`
        positions before it. One bit-parallel pass with the tiles as the bit vector's lanes
        (a zero spare bit after each) and the reference as the text it reads gives the LCS of
        the reference and every prefix of every tile: the prefix that ends where the window
        ends contains the window, so its LCS bounds the window's.

        Args:
            rho: The reference's index.
            reference: Its token ids.

        Returns:
            `(n − 2|r| + 1,)` int64 upper bounds of the windows' LCS.
        """
        n, width = self.text.size, 2 * len(reference)
        tile = 2 * width
        # bit of each text position in the two cuts, a zero spare bit after every tile
        first_cut = np.arange(n) + np.arange(n) // tile
        split = n + (n + tile - 1) // tile
        second_cut = split + np.arange(n - width) + np.arange(n - width) // tile
        size = int(second_cut[-1]) + 2
        local = self.slots[rho, :n] - self.first_row[rho]  # < 0: a token absent from it
        hits = np.zeros((int(self.first_row[rho + 1] - self.first_row[rho]), size), dtype=bool)
        present = np.flatnonzero(local >= 0)
        hits[local[present], first_cut[present]] = True
        later = present[present >= width]
        hits[local[later], second_cut[later - width]] = True
        masks = [int.from_bytes(r.tobytes(), "little") for r in np.packbits(hits, 1, "little")]
        lane = np.zeros(size, dtype=bool)
        lane[first_cut] = lane[second_cut] = True
        full = int.from_bytes(np.packbits(lane, bitorder="little").tobytes(), "little")
        v = full
        for mask in [masks[key] for key in (self.rows[rho] - self.first_row[rho]).tolist()]:
            u = mask & v
            if u:  # `& full` drops the carries that reach the spare bits
                v = ((v + u) | (v ^ u)) & full
        matched = np.unpackbits(
            np.frombuffer((full ^ v).to_bytes((size + 7) // 8, "little"), dtype=np.uint8),
            count=size,
            bitorder="little",
        )
        count_a = np.concatenate([[0], np.cumsum(matched[first_cut], dtype=np.int64)])
        count_b = np.concatenate([[0], np.cumsum(matched[second_cut], dtype=np.int64)])
        start = np.arange(n - width + 1)
        second = start % tile >= width  # the window lies in a tile of the second cut
        q = np.where(second, start - width, start)  # position in its cut
        end, head = q + width, q - q % tile  # the window's end, its tile's start
        in_b = count_b[np.minimum(end, n - width)] - count_b[head]  # (clipped: unused there)
        return np.where(second, in_b, count_a[end] - count_a[head])

    def lcs(self, rho: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """`LCS(reference[rho[q]], text[lo[q] : hi[q]])` for every lane q, in lane passes.

        Args:
            rho: `(Q,)` reference indices.
            lo: `(Q,)` segment starts.
            hi: `(Q,)` segment ends (`lo < hi ≤ n`).

        Returns:
            `(Q,)` int64 LCS lengths.
        """
        out = np.empty(rho.size, dtype=np.int64)
        per = max(1, _PASS_WORDS // (int((hi - lo).max()) * self.words))
        for a in range(0, rho.size, per):
            part = slice(a, a + per)
            out[part] = self._pass(rho[part], lo[part], hi[part])
        return out

    def _pass(self, rho: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        steps, lanes, words = int((hi - lo).max()), rho.size, self.words
        position = lo[None, :] + np.arange(steps)[:, None]  # (steps, lanes)
        position = np.where(position < hi[None, :], position, self.text.size)  # padding
        masks = self.table[self.slots[rho[None, :], position]]  # (steps, lanes, words)
        data = memoryview(np.ascontiguousarray(masks)).cast("B")
        length = self.lengths[rho]
        bits = np.clip(length[:, None] - 64 * np.arange(words)[None, :], 0, 64)
        low = np.left_shift(np.uint64(1), np.minimum(bits, 63).astype(np.uint64)) - np.uint64(1)
        full = int.from_bytes(np.where(bits == 64, _ALL_ONES, low).tobytes(), "little")
        # Zero bits of each lane mark the reference positions matched so far (Hyyrö's
        # V' = (V + (V & M)) | (V & ~M), with V − (V & M) = V ^ (V & M)); `& full` clears the
        # carries that reach a lane's spare bits, so no lane spills into the next.
        v, row, from_bytes = full, lanes * words * 8, int.from_bytes
        for offset in range(0, steps * row, row):
            u = from_bytes(data[offset : offset + row], "little") & v
            if u:
                v = ((v + u) | (v ^ u)) & full
        left = np.frombuffer(v.to_bytes(row, "little"), dtype=np.uint64).reshape(lanes, words)
        return length - np.bitwise_count(left).sum(axis=1, dtype=np.int64)


def _search(text: np.ndarray, references: list[list[int]], needs: list[int | None]) -> list[int]:
    """Max over windows of `LCS(reference, window)` for each reference, exact when need is None.

    With a need, the value returned is only correct on its side of the need (≥ need when
    some window reaches it, < need otherwise).

    Args:
        text: `(n,)` int64 token ids, longer than every reference's window `2|r|`.
        references: R non-empty references.
        needs: Per reference, the LCS that decides it, or None for the exact maximum.

    Returns:
        R window LCS values.
    """
    lanes = _Lanes(text, references)
    n = text.size
    best = [0 if need is None else need - 1 for need in needs]  # a value ≤ best changes nothing
    whole = lanes.count_bounds().tolist()
    starts, bounds, group = [], [], []
    for rho, reference in enumerate(references):
        width = 2 * len(reference)
        last = n - width
        on = np.append(np.flatnonzero(lanes.on_token(rho)[:last]), last)
        if whole[rho] <= best[rho]:
            on = on[:0]
        # Both bounds hold; the likelier to prune goes first. Token counts prune little
        # when most of a window's tokens occur in the reference (a small alphabet).
        kinds = ["counts", "tiles"]
        if on.size * width > n * (best[rho] + 1):
            kinds.reverse()
        bound = np.full(on.size, len(reference), dtype=np.int64)
        for kind in kinds:
            if on.size == 0:
                break
            if kind == "counts":
                more = _window_bounds(text, reference, width)
            else:
                more = lanes.tiled_bounds(rho, reference)
            bound = np.minimum(bound, more[on])
            on, bound = on[bound > best[rho]], bound[bound > best[rho]]
        starts.append(on)
        bounds.append(bound)
        group.append(max(1, width // 4))
    decided = [False] * len(references)
    probes = 4  # the first pass only computes a few best-bound windows exactly
    while True:
        plan: list[tuple[int, int, np.ndarray]] = []  # (reference, probes, start → group)
        rho_l, lo_l, hi_l = [], [], []
        for rho, reference in enumerate(references):
            if decided[rho] or starts[rho].size == 0:
                continue
            width = 2 * len(reference)
            top = np.sort(np.argsort(-bounds[rho], kind="stable")[:probes])
            probe = starts[rho][top]  # the likeliest leaks, computed exactly
            starts[rho], bounds[rho] = np.delete(starts[rho], top), np.delete(bounds[rho], top)
            count = starts[rho].size
            if probes > 1:  # groups from the next pass on
                first = np.zeros(0, dtype=np.int64)
            else:  # starts (sorted) that share `start // group[rho]`: one segment each
                first = np.flatnonzero(np.diff(starts[rho] // group[rho], prepend=-1))
                if group[rho] == 1 or count <= 2 * first.size:  # single windows: exact
                    first = np.arange(count)
            end = np.append(first[1:], count)[: first.size] - 1
            lo = np.concatenate([probe, starts[rho][first]])
            hi = np.concatenate([probe, starts[rho][end]]) + width
            member = np.searchsorted(first, np.arange(count), "right") - 1
            plan.append((rho, probe.size, member if first.size else np.zeros(0, np.int64)))
            rho_l.append(np.full(lo.size, rho))
            lo_l.append(lo)
            hi_l.append(hi)
        if not plan:
            break
        lo, hi = np.concatenate(lo_l), np.concatenate(hi_l)
        values = lanes.lcs(np.concatenate(rho_l), lo, hi)
        at = 0
        for rho, count, member in plan:
            width = 2 * int(lanes.lengths[rho])
            groups = 0 if member.size == 0 else int(member[-1]) + 1
            value = values[at : at + count + groups]
            single = (hi - lo)[at : at + count + groups] == width  # exact: one window
            at += count + groups
            top_exact = int(value[single].max())
            if top_exact > best[rho]:
                best[rho] = top_exact
                if needs[rho] is not None:
                    decided[rho] = True
                    continue
            alive = bounds[rho] > best[rho]
            if member.size:
                keep = (value[count:] > best[rho]) & ~single[count:]
                alive &= keep[member]
                group[rho] = max(1, group[rho] // 4)
            starts[rho], bounds[rho] = starts[rho][alive], bounds[rho][alive]
        probes = 1
    return best


def _decide(text: list[int], references: list[list[int]], threshold: float) -> list[bool]:
    """For each reference, whether its overlap with the text exceeds `threshold`."""
    flags = [False] * len(references)
    todo: list[int] = []
    needs: list[int | None] = []
    for i, reference in enumerate(references):
        if not reference:
            flags[i] = threshold < 0.0
            continue
        need = _needed(threshold, len(reference))
        if need > min(len(text), len(reference)):  # the LCS cannot be longer than either
            continue
        if need == 0:
            flags[i] = True
        elif len(text) <= 2 * len(reference):  # one window: the whole text
            flags[i] = _whole_lcs(text, reference, need) >= need
        else:
            todo.append(i)
            needs.append(need)
    if todo:
        text_np = np.asarray(text, dtype=np.int64)
        values = _search(text_np, [references[i] for i in todo], needs)
        for i, need, value in zip(todo, needs, values, strict=True):
            flags[i] = value >= need  # type: ignore[operator]
    return flags


def _whole_lcs(text: list[int], reference: list[int], need: int | None) -> int:
    """LCS of the reference and the whole text (a text no longer than one window)."""
    if need is not None and sum((Counter(text) & Counter(reference)).values()) < need:
        return 0
    if len(text) < len(reference):
        return _lcs_bits(_masks(reference), len(reference), text)
    return _lcs_bits(_masks(text), len(text), reference)


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
    if not reference or not text:
        return 0.0
    if len(text) <= 2 * len(reference):
        return _whole_lcs(text, reference, None) / len(reference)
    return _search(np.asarray(text, dtype=np.int64), [reference], [None])[0] / len(reference)


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
    return _decide(text, [_as_list(reference_ids, "reference_ids")], threshold)[0]


def leak_mask(text_ids: TokenIds, references: Sequence[TokenIds], threshold: float) -> Tensor:
    """Which of many references overlap one text by more than `threshold`.

    The shape of both filters in Memory³: a training sequence against the reference each of
    its 32 chunks retrieved, or an evaluation chunk against its 5+ retrieved references.
    All the references are checked together, in shared lane passes over the text.

    Args:
        text_ids: `(T,)` token ids of the text.
        references: R references, each `(L_r,)` token ids (lengths may differ).
        threshold: The leakage threshold.

    Returns:
        `(R,)` bool tensor, True where the reference must be dropped.
    """
    threshold = _check_threshold(threshold)
    text = _as_list(text_ids, "text_ids")
    refs = [_as_list(reference, f"references[{i}]") for i, reference in enumerate(references)]
    return torch.tensor(_decide(text, refs, threshold), dtype=torch.bool)


# ----------------------------------------------------- the previous implementation (baseline)
# One bit-parallel LCS per window, windows tried best count bound first. Exact, but on a small
# alphabet (bytes) the bounds rarely prune and nearly every window is tried. Kept as the
# baseline that benchmarks/retrieval_latency.py times against, and as a second reference in
# the tests.


def _baseline_max_window_lcs(
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


def _baseline_exceeds(
    text: list[int], text_np: np.ndarray | None, reference: list[int], t: float
) -> bool:
    if not reference:
        return t < 0.0
    need = _needed(t, len(reference))
    if need > min(len(text), len(reference)):  # the LCS cannot be longer than either
        return False
    if need == 0:
        return True
    return _baseline_max_window_lcs(text, text_np, reference, need) >= need


def _baseline_overlap(text_ids: TokenIds, reference_ids: TokenIds) -> float:
    """`overlap`, as the previous implementation computed it."""
    text = _as_list(text_ids, "text_ids")
    reference = _as_list(reference_ids, "reference_ids")
    if not reference:
        return 0.0
    return _baseline_max_window_lcs(text, None, reference, None) / len(reference)


def _baseline_leak_mask(
    text_ids: TokenIds, references: Sequence[TokenIds], threshold: float
) -> Tensor:
    """`leak_mask`, as the previous implementation computed it (one reference at a time)."""
    threshold = _check_threshold(threshold)
    text = _as_list(text_ids, "text_ids")
    text_np = np.asarray(text, dtype=np.int64)
    flags = [
        _baseline_exceeds(text, text_np, _as_list(reference, f"references[{i}]"), threshold)
        for i, reference in enumerate(references)
    ]
    return torch.tensor(flags, dtype=torch.bool)
