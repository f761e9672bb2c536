"""Which references a query chunk keeps: its best clean candidates (paper §3.1, Eq. 6).

`Retriever` embeds a group of query chunks and hands the vectors here. `select_references`
then, for each chunk,

1. searches the index for `k · overfetch` candidates, best first (just `k` with the leakage
   filter off);
2. drops the candidates that match nothing: all of a chunk whose embedding is zero (a text
   without features is similar to no reference), and with `min_score` set every one scoring
   at most it;
3. checks the remaining candidates against the chunk's leak text (`Query.leak`) best first,
   and only as many as it takes to keep `k` (`overlap.leak_mask`: Eq. 6 above the
   threshold leaks), reading each reference's token ids once;
4. searches wider, twice as many candidates each time up to the whole index, for the chunks
   that still have fewer than `k` clean references, so that `k` remain whenever the index
   holds enough clean ones. A chunk that lost a candidate to step 2 is not searched wider:
   an index returns candidates best first, so none further down scores more.

The result is `(G, k)` reference ids and scores per group of `G` chunks, best first, with id
−1 and score −inf in the slots left empty.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from torch import Tensor

from m3.retrieval.overlap import leak_mask

if TYPE_CHECKING:
    from m3.backends.base import MemoryIndex


class Query(NamedTuple):
    """One query chunk, as the retriever searches for it.

    Attributes:
        text: The chunk's text, which is embedded.
        leak: The token ids the leakage filter checks its candidates against; None leaves
            them unchecked.
    """

    text: str
    leak: list[int] | None


def select_references(
    queries: Sequence[Query],
    vectors: Tensor,
    *,
    index: MemoryIndex,
    k: int,
    overfetch: int,
    threshold: float | None,
    min_score: float | None,
    reference_tokens: Callable[[set[int]], dict[int, list[int]]],
    timed: Callable[[str, float], float],
) -> tuple[np.ndarray, np.ndarray]:
    """Search, drop unmatched candidates, filter leaking ones, widen: `k` clean per query.

    Args:
        queries: `G` query chunks.
        vectors: `(G, dim)` their embeddings (a zero row matches nothing).
        index: Searches the reference embeddings.
        k: References kept per query.
        overfetch: Candidates searched per query first, as a multiple of `k`.
        threshold: The leakage threshold on Eq. 6's overlap; None turns the filter off.
        min_score: Candidates scoring at most this are dropped; None keeps them.
        reference_tokens: The token ids of references, by id (e.g. through a cache).
        timed: Adds the seconds since a `time.perf_counter()` reading to a phase
            ("search", "filter") and returns the current reading.

    Returns:
        `(G, k)` int64 reference ids and float32 scores, best first; −1 and −inf where
        fewer than `k` clean references were found.
    """
    total = len(index)
    clock = time.perf_counter()
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    blank = ~vectors.any(dim=1).cpu().numpy()  # zero embeddings: they match nothing
    if blank.all():
        return ids, scores
    fetch = min(k * overfetch if threshold is not None else k, total)
    found = index.search(vectors, fetch)
    timed("search", clock)
    cand_ids, cand_scores, exhausted = _drop_unmatched(
        found.ids.numpy(), found.scores.float().numpy(), blank, min_score
    )
    if threshold is None:
        ids[:, :fetch], scores[:, :fetch] = cand_ids, cand_scores
        return ids, scores
    kept: list[list[tuple[int, float]]] = [[] for _ in queries]
    checked: list[set[int]] = [set() for _ in queries]
    open_rows = [q for q in range(len(queries)) if not blank[q]]
    while open_rows:
        clock = time.perf_counter()
        _keep_clean(
            queries, open_rows, cand_ids, cand_scores, kept, checked, k, threshold, reference_tokens
        )
        timed("filter", clock)
        # a row whose candidates already reached `min_score` finds no better ones wider
        short = [q for q in open_rows if len(kept[q]) < k and not exhausted[q]]
        if not short or fetch >= total:
            break
        clock = time.perf_counter()
        fetch = min(fetch * 2, total)
        wider = index.search(vectors[short], fetch)
        timed("search", clock)
        cand_ids = np.full((len(queries), fetch), -1, dtype=np.int64)
        cand_scores = np.full((len(queries), fetch), -np.inf, dtype=np.float32)
        cand_ids[short], cand_scores[short], exhausted[short] = _drop_unmatched(
            wider.ids.numpy(), wider.scores.float().numpy(), blank[short], min_score
        )
        open_rows = short
    for q, hits in enumerate(kept):
        for j, (reference_id, score) in enumerate(hits):
            ids[q, j], scores[q, j] = reference_id, score
    return ids, scores


def _drop_unmatched(
    ids: np.ndarray, scores: np.ndarray, blank: np.ndarray, min_score: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates without the ones that match nothing: `(ids, scores, exhausted)`.

    Every candidate of a blank (zero-embedding) query, and with `min_score` set each one
    scoring at most it, becomes id −1, score −inf. `exhausted` marks the rows that lost
    a candidate so: searching them wider would only add worse ones.
    """
    drop = np.zeros(ids.shape, dtype=bool)
    drop[blank] = True
    if min_score is not None:
        drop |= scores <= min_score
    drop &= ids >= 0
    ids, scores = np.where(drop, -1, ids), np.where(drop, -np.inf, scores)
    return ids, scores.astype(np.float32), drop.any(axis=1)


def _keep_clean(
    queries: Sequence[Query],
    rows: list[int],
    cand_ids: np.ndarray,
    cand_scores: np.ndarray,
    kept: list[list[tuple[int, float]]],
    checked: list[set[int]],
    k: int,
    threshold: float,
    reference_tokens: Callable[[set[int]], dict[int, list[int]]],
) -> None:
    """Check candidates best first, just enough of them to keep `k` per query if clean."""
    position = dict.fromkeys(rows, 0)
    while True:
        todo: dict[int, list[tuple[int, float]]] = {}
        for q in rows:
            need = k - len(kept[q])
            picked = []
            line = cand_ids[q]
            while need > len(picked) and position[q] < line.size:
                reference_id = int(line[position[q]])
                score = float(cand_scores[q, position[q]])
                position[q] += 1
                if reference_id >= 0 and reference_id not in checked[q]:
                    checked[q].add(reference_id)
                    picked.append((reference_id, score))
            if picked:
                todo[q] = picked
        if not todo:
            break
        tokens = reference_tokens({i for picked in todo.values() for i, _ in picked})
        for q, picked in todo.items():
            leak = queries[q].leak
            if leak is None:
                kept[q].extend(picked)
                continue
            drop = leak_mask(leak, [tokens[i] for i, _ in picked], threshold)
            kept[q].extend(
                hit for hit, dropped in zip(picked, drop.tolist(), strict=True) if not dropped
            )
