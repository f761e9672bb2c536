"""A reference: a piece of a document that becomes one explicit memory, with its provenance.

Defined here, below every layer, because the chunkers make references, the stores keep them
and retrieval reports them. `m3.data.chunking` cuts documents into them.
"""

from __future__ import annotations

from typing import NamedTuple, Union

#: Identifier of a document in a corpus: a name (file, title) or a number.
DocId = Union[str, int]  # noqa: UP007 - a runtime alias must work on Python 3.10


class Span(NamedTuple):
    """A half-open range `[start, end)` of token positions.

    Attributes:
        start: First position in the span.
        end: One past the last position in the span.
    """

    start: int
    end: int

    @property
    def length(self) -> int:
        """Number of positions in the span."""
        return self.end - self.start


class Reference(NamedTuple):
    """A piece of a document that becomes one explicit memory, with its provenance.

    Attributes:
        doc_id: The document it was cut from.
        start: Position of its first token in the document's token ids.
        end: One past the position of its last token.
        ids: Its token ids, `document_ids[start:end]`, without the reference prefix.
    """

    doc_id: DocId
    start: int
    end: int
    ids: tuple[int, ...]

    @property
    def span(self) -> Span:
        """Where the reference lies in its document."""
        return Span(self.start, self.end)
