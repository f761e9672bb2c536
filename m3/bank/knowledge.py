"""A knowledge base read into references: the one definition of reference ids.

A reference's id is its position in the list `read_knowledge` returns: documents of the
sources in order, each cut by the chunker. The bank and the continual stage's pairing
(`m3.training.datamodule.TextDataModule.build_references`) both read it, so a retriever maps
ids back to the same token ids everywhere.

`KnowledgeDocuments` streams the documents of the sources: `check()` reads them all once,
refusing malformed input, empty sources and repeated ids before anything is tokenized
(holding 8 bytes per document, not the texts), and every later pass reads the sources
again. `m3 build-memory` cuts them into its reference table (`m3.bank.table`) that way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m3.core.errors import UserError
from m3.core.references import Reference
from m3.data.chunking import Chunker, iter_references
from m3.data.sources import SeenIds, TextSource

if TYPE_CHECKING:
    from m3.data.documents import Document
    from m3.data.tokenizer import Tokenizer


@dataclass
class KnowledgeBase:
    """The references of a knowledge base and what reading it found.

    Attributes:
        references: The references; a reference's id is its position (a list, or the
            bank's `m3.bank.table.ReferenceTable`, read from disk by id).
        documents: Documents that gave at least one reference.
        skipped: Documents left out: empty, whitespace-only or tokenizing to nothing.
    """

    references: Sequence[Reference]
    documents: int
    skipped: int


class KnowledgeDocuments:
    """The documents of a knowledge base's sources, streamed: each pass reads them anew.

    Args:
        sources: The knowledge base's sources (`data.knowledge`), in order.

    Attributes:
        documents: Documents read (non-empty), once `check` ran.
        skipped: Empty documents the sources left out, once `check` ran.
        has_text: Whether some document holds more than white space, once `check` ran.
    """

    def __init__(self, sources: Sequence[TextSource]) -> None:
        self.sources = list(sources)
        self.documents = self.skipped = 0
        self.has_text = False

    def __iter__(self) -> Iterator[Document]:
        """The documents of the sources in order (read again; `check` them first)."""
        for source in self.sources:
            for _, document in source.placed():
                if document is not None:
                    yield document

    def check(self, tokenizer: Tokenizer | None = None, chunker: Chunker | None = None) -> str:
        """Read every document once and check them all, before anything is tokenized.

        Args:
            tokenizer: With `chunker`, the digest returned is the reference table's
                `documents_fingerprint` of these documents.
            chunker: See `tokenizer`.

        Returns:
            The documents' digest (`m3.bank.table.documents_fingerprint`); "" without a
            tokenizer and chunker.

        Raises:
            UserError: When the sources hold no text at all (naming them), for files with
                undecodable bytes or documents longer than their source's
                `max_document_bytes` (naming the file), or for two documents with the same
                id, in one source or in two (naming where both were read: a bank's
                documents are edited and deleted by id).
        """
        stream = self._checked()
        if tokenizer is None or chunker is None:
            for _ in stream:
                pass
            return ""
        from m3.bank.table import documents_fingerprint

        return documents_fingerprint(stream, tokenizer, chunker)

    def _checked(self) -> Iterator[Document]:
        """The documents, each source checked after its last one, the ids after all."""
        seen, skipped, has_text = SeenIds(), 0, False
        for source in self.sources:  # every source is read and checked before any tokenizing
            start, skipped_here = len(seen), 0
            try:
                for _, document in source.placed():
                    if document is None:
                        skipped_here += 1
                        continue
                    seen.add(document.id)
                    has_text = has_text or bool(document.text.strip())
                    yield document
                source.check_whole(seen, skipped_here, start=start)
            except UserError as error:
                if not str(error).startswith("no text in"):
                    raise
                raise UserError(f"data.knowledge: the knowledge base is empty: {error}") from None
            skipped += skipped_here
        try:  # places are read again (each source's `read()`) only when an id repeats
            seen.check(lambda: ((d.id, p) for s in self.sources for d, p in s.read().placed()))
        except UserError as error:
            raise UserError(f"data.knowledge: {error}") from None
        self.documents, self.skipped, self.has_text = len(seen), skipped, has_text


def read_documents(sources: Sequence[TextSource]) -> tuple[list[Document], int]:
    """Read every source of a knowledge base and check it, before anything is tokenized.

    The documents are held as a list here; `KnowledgeDocuments` streams them instead.

    Args:
        sources: The knowledge base's sources (`data.knowledge`).

    Returns:
        The documents of the sources in order, and how many empty ones were left out.

    Raises:
        UserError: As `KnowledgeDocuments.check`.
    """
    knowledge = KnowledgeDocuments(sources)
    knowledge.check()
    return list(knowledge), knowledge.skipped


def empty_knowledge(sources: Sequence[TextSource], skipped: int) -> UserError:
    """The error for a knowledge base none of whose documents has a token.

    Args:
        sources: The knowledge base's sources, named in the message.
        skipped: Empty documents left out, counted in the message.

    Returns:
        The error, to raise.
    """
    names = "; ".join(s.describe() for s in sources) or "(no sources)"
    return UserError(
        f"data.knowledge: the knowledge base is empty: no document with text in {names} "
        f"({skipped} empty documents skipped)"
    )


def read_knowledge(
    sources: Sequence[TextSource], tokenizer: Tokenizer, *, chunker: Chunker
) -> KnowledgeBase:
    """Tokenize the knowledge base's documents and cut them into references.

    This is the one definition of reference ids, shared by the continual stage's pairing
    (`m3.training.datamodule.TextDataModule.build_references`), the bank and its reference
    table (`m3.bank.table`, which writes the same references to disk): documents of the
    sources in order, each cut by the chunker.

    Args:
        sources: The knowledge base's sources (`data.knowledge`).
        tokenizer: Tokenizes the documents.
        chunker: Cuts each document into references of at most `max_tokens` tokens.

    Returns:
        The references and the counts of documents read and skipped.

    Raises:
        UserError: As `KnowledgeDocuments.check`, and when no document has a token.
    """
    documents = KnowledgeDocuments(sources)
    documents.check()
    counts = {"given": 0, "skipped": documents.skipped}

    def tokenized() -> Iterator[tuple[str, list[int]]]:
        for document in documents:
            ids = tokenizer.encode(document.text) if document.text.strip() else []
            counts["given" if ids else "skipped"] += 1
            yield document.id, ids  # a document without tokens gives no reference

    references = list(iter_references(tokenized(), chunker))
    if not counts["given"]:
        raise empty_knowledge(sources, counts["skipped"])
    return KnowledgeBase(references, counts["given"], counts["skipped"])
