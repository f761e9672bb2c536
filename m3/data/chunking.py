"""Chunking: token ids in, half-open spans out. Knows nothing about tokenizers.

Two kinds of chunks exist in Memory³ (paper §3.1, §3.3):

- **references**, the pieces of the knowledge base that become memories: each document is
  cut into spans of at most 128 tokens (`FixedChunker`, or `BoundaryChunker`, which prefers
  to end a span after a sentence or paragraph boundary), and `chunk_documents` turns the
  spans into `Reference`s that keep their provenance;
- **query chunks**, the pieces of context that each retrieve memories: fixed runs of 64
  tokens counted from the context's BOS (`query_chunks`, `chunk_index`).

```python
from m3.data.chunking import BoundaryChunker, boundary_ids_for, chunk_documents

chunker = BoundaryChunker(128, boundary_ids=boundary_ids_for(tokenizer))
references = chunk_documents([("doc-1", tokenizer.encode(text))], chunker)
```
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from m3.core.checks import check_int
from m3.core.errors import UserError
from m3.core.references import DocId, Reference, Span

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer

#: Characters after which `boundary_ids_for` lets a reference end: sentence ends (Latin and
#: CJK) and line breaks.
DEFAULT_BOUNDARIES = ".!?\n。！？"


def _fixed_spans(length: int, size: int) -> list[Span]:
    return [Span(start, min(start + size, length)) for start in range(0, length, size)]


class Chunker(abc.ABC):
    """Cuts a sequence of token ids into spans for references.

    The spans a chunker returns tile its input: they are non-empty, in order, each starts
    where the previous one ended, the first starts at 0, the last ends at `len(ids)`, and
    none is longer than `max_tokens`. An empty input gives no spans.

    Args:
        max_tokens: Longest span, in tokens (the paper: 128).

    Raises:
        UserError: When `max_tokens` is not a positive integer.
    """

    def __init__(self, max_tokens: int = 128) -> None:
        self.max_tokens = check_int(None, "max_tokens", max_tokens, low=1)

    @abc.abstractmethod
    def chunk(self, ids: Sequence[int]) -> list[Span]:
        """Cut token ids into spans that tile them.

        Args:
            ids: The token ids of one document.

        Returns:
            The spans, in order.
        """

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(max_tokens={self.max_tokens})"


class FixedChunker(Chunker):
    """Consecutive spans of exactly `max_tokens` tokens; the last one may be shorter.

    Args:
        max_tokens: Tokens per span (the paper: 128).

    Raises:
        UserError: When `max_tokens` is not a positive integer.
    """

    def __init__(self, max_tokens: int = 128) -> None:
        super().__init__(max_tokens)

    def chunk(self, ids: Sequence[int]) -> list[Span]:
        """Cut token ids into spans of `max_tokens`.

        Args:
            ids: The token ids of one document.

        Returns:
            The spans, in order.
        """
        return _fixed_spans(len(ids), self.max_tokens)


class BoundaryChunker(Chunker):
    r"""Spans that end right after a boundary token where possible.

    From the start of each span, the span ends after the *last* boundary token among its
    first `max_tokens` tokens, provided the span is then at least `min_tokens` long;
    without such a boundary it is cut at `max_tokens`, like `FixedChunker`. The rest of a
    document that fits in `max_tokens` becomes its last span, which may therefore be
    shorter than `min_tokens`.

    The boundary ids come from the caller, so the chunker works on ids alone;
    `boundary_ids_for` finds them in a tokenizer's vocabulary.

    Args:
        max_tokens: Longest span, in tokens (the paper: 128).
        boundary_ids: Ids of tokens after which a span may end, such as those of ".", "\n".
        min_tokens: Shortest span that may end at a boundary. Raise it (e.g. to a quarter
            of `max_tokens`) to avoid tiny references when the only boundary in a window
            comes early.

    Raises:
        UserError: When `max_tokens` or `min_tokens` is out of range, or `boundary_ids` is
            empty or holds negative ids.
    """

    def __init__(
        self, max_tokens: int = 128, *, boundary_ids: Sequence[int], min_tokens: int = 1
    ) -> None:
        super().__init__(max_tokens)
        min_tokens = check_int(None, "min_tokens", min_tokens, low=1)
        if min_tokens > max_tokens:
            raise UserError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")
        if isinstance(boundary_ids, (str, bytes)):
            raise UserError(f"boundary_ids must be a list of token ids, got {boundary_ids!r}")
        boundaries = [check_int(None, "each of boundary_ids", i, low=0) for i in boundary_ids]
        if not boundaries:
            raise UserError(
                "boundary_ids must hold at least one token id; "
                "use FixedChunker for spans of a fixed length"
            )
        self.boundary_ids = frozenset(boundaries)
        self.min_tokens = min_tokens

    def chunk(self, ids: Sequence[int]) -> list[Span]:
        """Cut token ids into spans that prefer to end after a boundary.

        Args:
            ids: The token ids of one document.

        Returns:
            The spans, in order.
        """
        values = ids.tolist() if hasattr(ids, "tolist") else ids  # tensors hash by identity
        n = len(values)
        # Positions of boundary tokens, so each span needs one binary search, not a scan.
        marks = [p for p, i in enumerate(values) if i in self.boundary_ids]
        spans = []
        start = 0
        while start < n:
            if n - start <= self.max_tokens:
                end = n
            else:
                end = start + self.max_tokens
                # Last boundary at a position p with start + min_tokens - 1 <= p < end.
                k = bisect.bisect_left(marks, end) - 1
                if k >= 0 and marks[k] >= start + self.min_tokens - 1:
                    end = marks[k] + 1
            spans.append(Span(start, end))
            start = end
        return spans

    def __repr__(self) -> str:
        return (
            f"BoundaryChunker(max_tokens={self.max_tokens}, "
            f"boundary_ids={sorted(self.boundary_ids)}, min_tokens={self.min_tokens})"
        )


def boundary_ids_for(tokenizer: Tokenizer, boundaries: str = DEFAULT_BOUNDARIES) -> list[int]:
    r"""Find the ids of the tokens after which a span may end.

    A token counts when its text ends with one of the boundary characters: with bytes that
    is the single characters themselves; with a BPE it also catches merged tokens such as
    `".\n"` or `"\n\n"`. Special ids never count.

    Args:
        tokenizer: Any tokenizer; only `decode`, `vocab_size` and the special ids are used.
        boundaries: The boundary characters.

    Returns:
        The ids, in increasing order.
    """
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    ends = tuple(boundaries)
    return [
        i
        for i in range(tokenizer.vocab_size)
        if i not in special and tokenizer.decode([i]).endswith(ends)
    ]


def iter_references(
    docs: Iterable[tuple[DocId, Sequence[int]]], chunker: Chunker
) -> Iterator[Reference]:
    """Cut documents into references lazily, keeping their provenance.

    Use it instead of `chunk_documents` for corpora too large to hold as one list.

    Args:
        docs: Pairs of document id and the document's token ids. Empty documents are
            skipped.
        chunker: How to cut each document.

    Yields:
        The references, document by document, in order.

    Raises:
        UserError: When the chunker returns spans that do not tile a document or exceed its
            `max_tokens` (only possible with a faulty `Chunker` subclass).
    """
    for doc_id, ids in docs:
        if len(ids) == 0:
            continue
        position = 0
        for start, end in chunker.chunk(ids):
            if start != position or not start < end <= len(ids):
                raise UserError(
                    f"{chunker!r} returned span [{start}, {end}) for document {doc_id!r} "
                    f"of {len(ids)} tokens after position {position}: spans must tile the ids"
                )
            if end - start > chunker.max_tokens:
                raise UserError(
                    f"{chunker!r} returned a span of {end - start} tokens for document "
                    f"{doc_id!r}, more than its max_tokens"
                )
            yield Reference(doc_id, start, end, tuple(int(i) for i in ids[start:end]))
            position = end
        if position != len(ids):
            raise UserError(
                f"{chunker!r} left tokens {position}..{len(ids) - 1} of document {doc_id!r} "
                "outside every span"
            )


def chunk_documents(
    docs: Iterable[tuple[DocId, Sequence[int]]], chunker: Chunker
) -> list[Reference]:
    """Cut documents into references, keeping their provenance.

    Args:
        docs: Pairs of document id and the document's token ids. Empty documents are
            skipped.
        chunker: How to cut each document.

    Returns:
        The references, document by document, in order.

    Raises:
        UserError: When the chunker returns spans that do not tile a document.
    """
    return list(iter_references(docs, chunker))


def query_chunks(length: int, chunk_length: int = 64) -> list[Span]:
    """Cut a context into the chunks that each retrieve memories.

    Chunks sit at fixed multiples of `chunk_length` counted from the context's BOS, which
    is token 0 of chunk 0; the last chunk may be partial (paper §3.1–§3.2).

    Args:
        length: Tokens in the context, its BOS included.
        chunk_length: Tokens per chunk (the paper: 64).

    Returns:
        The chunks, in order; none for an empty context.

    Raises:
        UserError: When `length` is negative or `chunk_length` is not positive.
    """
    length = check_int(None, "length", length, low=0)
    chunk_length = check_int(None, "chunk_length", chunk_length, low=1)
    return _fixed_spans(length, chunk_length)


def chunk_index(position: int, chunk_length: int = 64) -> int:
    """Index of the query chunk that holds a context position.

    Args:
        position: Position in the context, counted from its BOS (0).
        chunk_length: Tokens per chunk (the paper: 64).

    Returns:
        `position // chunk_length`.

    Raises:
        UserError: When `position` is negative or `chunk_length` is not positive.
    """
    position = check_int(None, "position", position, low=0)
    chunk_length = check_int(None, "chunk_length", chunk_length, low=1)
    return position // chunk_length
