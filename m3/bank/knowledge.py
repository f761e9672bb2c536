"""A knowledge base read into references: the one definition of reference ids.

A reference's id is its position in the list `read_knowledge` returns: documents of the
sources in order, each cut by the chunker. The bank and the continual stage's pairing
(`m3.training.datamodule.TextDataModule.build_references`) both read it, so a retriever maps
ids back to the same token ids everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m3.core.errors import UserError
from m3.core.references import Reference
from m3.data.chunking import Chunker, chunk_documents
from m3.data.sources import TextSource

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


def read_documents(sources: Sequence[TextSource]) -> tuple[list[Document], int]:
    """Read every source of a knowledge base and check it, before anything is tokenized.

    Args:
        sources: The knowledge base's sources (`data.knowledge`).

    Returns:
        The documents of the sources in order, and how many empty ones were left out.

    Raises:
        UserError: When the sources hold no text at all (naming them), for files with
            undecodable bytes or documents longer than their source's `max_document_bytes`
            (naming the file), or for two documents with the same id, in one source or in
            two (naming where both were read: a bank's documents are edited and deleted by
            id).
    """
    from m3.data.documents import check_unique_ids

    corpora = []
    for source in sources:  # every source is read and checked before any tokenizing
        try:
            corpora.append(source.read())
        except UserError as error:
            if not str(error).startswith("no text in"):
                raise
            raise UserError(f"data.knowledge: the knowledge base is empty: {error}") from None
    try:
        check_unique_ids((d.id, place) for corpus in corpora for d, place in corpus.placed())
    except UserError as error:
        raise UserError(f"data.knowledge: {error}") from None
    documents = [d for corpus in corpora for d in corpus.documents]
    return documents, sum(corpus.skipped for corpus in corpora)


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
        UserError: As `read_documents`, and when no document has a token.
    """
    documents, skipped = read_documents(sources)
    docs: list[tuple[str, list[int]]] = []
    for document in documents:
        ids = tokenizer.encode(document.text) if document.text.strip() else []
        if ids:
            docs.append((document.id, ids))
        else:
            skipped += 1
    if not docs:
        raise empty_knowledge(sources, skipped)
    return KnowledgeBase(chunk_documents(docs, chunker), len(docs), skipped)
