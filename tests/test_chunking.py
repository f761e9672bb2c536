"""Chunkers, references and query chunks: tiling, limits, boundaries, provenance."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from m3.core.errors import UserError
from m3.data.chunking import (
    BoundaryChunker,
    Chunker,
    FixedChunker,
    Reference,
    Span,
    boundary_ids_for,
    chunk_documents,
    chunk_index,
    iter_references,
    query_chunks,
)
from m3.data.tokenizer import ByteTokenizer, Tokenizer

# Small id alphabets make boundaries frequent enough to matter.
ids_lists = st.lists(st.integers(min_value=0, max_value=9), max_size=300)
boundary_sets = st.sets(st.integers(min_value=0, max_value=9), min_size=1)
limits = st.integers(min_value=1, max_value=40)


def assert_tiles(spans: list[Span], length: int, max_tokens: int) -> None:
    """Every position covered exactly once, in order, by non-empty spans within the limit."""
    covered = [p for span in spans for p in range(span.start, span.end)]
    assert covered == list(range(length))
    for span in spans:
        assert isinstance(span, Span)
        assert 1 <= span.length <= max_tokens
    for before, after in itertools.pairwise(spans):
        assert before.end == after.start


def reference_boundary_chunks(
    ids: Sequence[int], max_tokens: int, boundaries: set[int], min_tokens: int
) -> list[Span]:
    """Slow and plain: try every end of every span, keep the latest one after a boundary."""
    spans = []
    start = 0
    while start < len(ids):
        if len(ids) - start <= max_tokens:
            end = len(ids)
        else:
            ends = range(start + min_tokens, start + max_tokens + 1)
            after_boundary = [e for e in ends if ids[e - 1] in boundaries]
            end = max(after_boundary) if after_boundary else start + max_tokens
        spans.append(Span(start, end))
        start = end
    return spans


# --- FixedChunker -------------------------------------------------------------------------


@given(ids_lists, limits)
def test_fixed_chunker_tiles(ids: list[int], max_tokens: int) -> None:
    spans = FixedChunker(max_tokens).chunk(ids)
    assert_tiles(spans, len(ids), max_tokens)
    assert all(span.length == max_tokens for span in spans[:-1])


def test_fixed_chunker_default_is_the_papers() -> None:
    spans = FixedChunker().chunk(list(range(300)))
    assert spans == [Span(0, 128), Span(128, 256), Span(256, 300)]
    assert FixedChunker().chunk([]) == []


# --- BoundaryChunker ----------------------------------------------------------------------


@given(ids_lists, boundary_sets, limits, st.data())
def test_boundary_chunker_tiles(
    ids: list[int], boundaries: set[int], max_tokens: int, data: st.DataObject
) -> None:
    min_tokens = data.draw(st.integers(min_value=1, max_value=max_tokens))
    chunker = BoundaryChunker(max_tokens, boundary_ids=boundaries, min_tokens=min_tokens)
    assert_tiles(chunker.chunk(ids), len(ids), max_tokens)


@given(ids_lists, boundary_sets, limits, st.data())
def test_boundary_chunker_matches_reference(
    ids: list[int], boundaries: set[int], max_tokens: int, data: st.DataObject
) -> None:
    min_tokens = data.draw(st.integers(min_value=1, max_value=max_tokens))
    chunker = BoundaryChunker(max_tokens, boundary_ids=sorted(boundaries), min_tokens=min_tokens)
    expected = reference_boundary_chunks(ids, max_tokens, boundaries, min_tokens)
    assert chunker.chunk(ids) == expected


@given(ids_lists, boundary_sets, limits)
def test_boundary_chunker_ends_at_the_last_boundary_in_the_window(
    ids: list[int], boundaries: set[int], max_tokens: int
) -> None:
    spans = BoundaryChunker(max_tokens, boundary_ids=boundaries).chunk(ids)
    for span in spans[:-1]:
        window = ids[span.start : span.start + max_tokens]
        marks = [p for p, i in enumerate(window) if i in boundaries]
        if marks:
            assert span.length == marks[-1] + 1
            assert ids[span.end - 1] in boundaries
        else:
            assert span.length == max_tokens


def test_boundary_chunker_on_text() -> None:
    tok = ByteTokenizer()
    text = "One. Two two.\nThree three three three three."
    ids = tok.encode(text)
    chunker = BoundaryChunker(16, boundary_ids=boundary_ids_for(tok))
    pieces = [tok.decode(ids[s.start : s.end]) for s in chunker.chunk(ids)]
    assert pieces == ["One. Two two.\n", "Three three thre", "e three three."]


def test_boundary_chunker_min_tokens_skips_early_boundaries() -> None:
    ids = [1, 0, 2, 2, 2, 2, 2, 2, 2, 2]  # boundary 0 at position 1
    assert BoundaryChunker(4, boundary_ids=[0]).chunk(ids)[0] == Span(0, 2)
    assert BoundaryChunker(4, boundary_ids=[0], min_tokens=3).chunk(ids)[0] == Span(0, 4)


def test_boundary_chunker_keeps_a_rest_that_fits_whole() -> None:
    # Exactly max_tokens left: one span, even though a boundary would allow an earlier end.
    assert BoundaryChunker(4, boundary_ids=[0]).chunk([1, 0, 1, 1]) == [Span(0, 4)]
    assert BoundaryChunker(4, boundary_ids=[0]).chunk([1, 0, 1, 1, 1]) == [
        Span(0, 2),
        Span(2, 5),
    ]


def test_boundary_chunker_accepts_numpy_ids() -> None:
    ids = [5, 5, 0, 5, 5, 5, 0, 5, 5]
    chunker = BoundaryChunker(4, boundary_ids=np.array([0]))
    assert chunker.chunk(np.array(ids, dtype=np.int64)) == chunker.chunk(ids)
    assert chunker.chunk(ids) == [Span(0, 3), Span(3, 7), Span(7, 9)]


# --- argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8", None])
def test_max_tokens_is_checked(bad: object) -> None:
    with pytest.raises(UserError, match="max_tokens"):
        FixedChunker(bad)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="max_tokens"):
        BoundaryChunker(bad, boundary_ids=[0])  # type: ignore[arg-type]


def test_boundary_arguments_are_checked() -> None:
    with pytest.raises(UserError, match="min_tokens"):
        BoundaryChunker(8, boundary_ids=[0], min_tokens=0)
    with pytest.raises(UserError, match="min_tokens"):
        BoundaryChunker(8, boundary_ids=[0], min_tokens=9)
    with pytest.raises(UserError, match="boundary_ids"):
        BoundaryChunker(8, boundary_ids=[])
    with pytest.raises(UserError, match="boundary_ids"):
        BoundaryChunker(8, boundary_ids=[3, -1])
    with pytest.raises(UserError, match="boundary_ids"):
        BoundaryChunker(8, boundary_ids=".\n")  # type: ignore[arg-type]


def test_chunker_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        Chunker()  # type: ignore[abstract]


# --- boundary_ids_for ---------------------------------------------------------------------


class MergedTokenizer(Tokenizer):
    """A tiny vocabulary with merged tokens, as a BPE has."""

    pieces: ClassVar[list[str]] = [
        *["a", "b.", ".", ".\n", "\n\n", "?!", " ", "x.y"],
        *["<s>", "</s>", "<pad>"],
    ]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids if 0 <= i < 8)

    vocab_size = property(lambda self: len(self.pieces))
    bos_id = property(lambda self: 8)
    eos_id = property(lambda self: 9)
    pad_id = property(lambda self: 10)


def test_boundary_ids_for_bytes() -> None:
    tok = ByteTokenizer()
    assert boundary_ids_for(tok) == sorted(tok.encode(".!?\n"))
    assert boundary_ids_for(tok, ";") == tok.encode(";")


def test_boundary_ids_for_merged_tokens() -> None:
    assert boundary_ids_for(MergedTokenizer()) == [1, 2, 3, 4, 5]
    assert boundary_ids_for(MergedTokenizer(), "\n") == [3, 4]


# --- references ---------------------------------------------------------------------------


@given(
    st.lists(st.tuples(st.text(max_size=5), ids_lists), max_size=6, unique_by=lambda d: d[0]),
    limits,
)
def test_references_keep_provenance(docs: list[tuple[str, list[int]]], max_tokens: int) -> None:
    references = chunk_documents(docs, FixedChunker(max_tokens))
    by_id = dict(docs)
    for ref in references:
        assert isinstance(ref, Reference)
        assert list(ref.ids) == by_id[ref.doc_id][ref.start : ref.end]
        assert ref.span == Span(ref.start, ref.end)
        assert 1 <= len(ref.ids) <= max_tokens
    # Per document, the references rebuild it; empty documents give none.
    for doc_id, ids in docs:
        pieces = [r for r in references if r.doc_id == doc_id]
        assert [i for r in pieces for i in r.ids] == ids
        assert bool(pieces) == bool(ids)
    assert [r.doc_id for r in references] == [
        doc_id for doc_id, ids in docs for _ in FixedChunker(max_tokens).chunk(ids)
    ]


def test_references_from_a_boundary_chunker() -> None:
    docs = [(7, [1, 0, 1, 1, 0, 1]), (8, []), (9, [0])]
    refs = chunk_documents(docs, BoundaryChunker(3, boundary_ids=[0]))
    assert refs == [
        Reference(7, 0, 2, (1, 0)),
        Reference(7, 2, 5, (1, 1, 0)),
        Reference(7, 5, 6, (1,)),
        Reference(9, 0, 1, (0,)),
    ]


def test_iter_references_is_lazy() -> None:
    def docs():
        yield "a", [1, 2, 3]
        raise RuntimeError("read too far")

    first = next(iter_references(docs(), FixedChunker(2)))
    assert first == Reference("a", 0, 2, (1, 2))


class OverlappingChunker(Chunker):
    def chunk(self, ids: Sequence[int]) -> list[Span]:
        return [Span(0, len(ids)), Span(0, len(ids))]


class ShortChunker(Chunker):
    def chunk(self, ids: Sequence[int]) -> list[Span]:
        return [Span(0, 1)]


class GreedyChunker(Chunker):
    def chunk(self, ids: Sequence[int]) -> list[Span]:
        return [Span(0, len(ids))]


@pytest.mark.parametrize(
    ("chunker", "message"),
    [
        (OverlappingChunker(8), "tile"),
        (ShortChunker(8), "outside every span"),
        (GreedyChunker(2), "more than its max_tokens"),
    ],
)
def test_faulty_chunkers_are_caught(chunker: Chunker, message: str) -> None:
    with pytest.raises(UserError, match=message):
        chunk_documents([("doc", [1, 2, 3])], chunker)


# --- query chunks -------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=1, max_value=100))
def test_query_chunks_sit_at_fixed_multiples(length: int, chunk_length: int) -> None:
    spans = query_chunks(length, chunk_length)
    assert_tiles(spans, length, chunk_length)
    assert [span.start for span in spans] == list(range(0, length, chunk_length))
    for position in range(length):
        c = chunk_index(position, chunk_length)
        assert spans[c].start <= position < spans[c].end


def test_query_chunks_defaults() -> None:
    assert query_chunks(130) == [Span(0, 64), Span(64, 128), Span(128, 130)]
    assert query_chunks(0) == []
    assert chunk_index(63) == 0
    assert chunk_index(64) == 1
    assert chunk_index(np.int64(200)) == 3


def test_query_arguments_are_checked() -> None:
    with pytest.raises(UserError, match="length"):
        query_chunks(-1)
    with pytest.raises(UserError, match="chunk_length"):
        query_chunks(10, 0)
    with pytest.raises(UserError, match="position"):
        chunk_index(-1)
    with pytest.raises(UserError, match="chunk_length"):
        chunk_index(3, chunk_length=0)
