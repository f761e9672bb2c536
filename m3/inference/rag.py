"""The RAG baseline: references retrieved once per prompt and read as text before it.

The same embedder, index and leakage filter as explicit memory (the paper compares
Memory³ against RAG in §7), so the two differ only in how a reference is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m3.core.errors import UserError

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.retrieval.retriever import Retriever

#: How `rag_context` lays out each reference before the prompt (`{text}` is the reference).
RAG_TEMPLATE = "Reference: {text}\n"


@dataclass
class RetrievedReference:
    """One reference retrieved as text (the RAG baseline).

    Attributes:
        id: The reference's id in the bank.
        score: Its similarity to the query.
        text: Its text.
    """

    id: int
    score: float
    text: str


def rag_references(
    retriever: Retriever, prompts: Sequence[str], *, k: int | None = None
) -> list[list[RetrievedReference]]:
    """Retrieve references once per prompt, with the whole prompt as query text (RAG).

    The same embedder, index and leakage filter as for memories (the filter checks the
    prompt's tokens); no memory is read from the store.

    Args:
        retriever: The retriever over the bank.
        prompts: `B` prompts.
        k: References per prompt; the retriever's `k` when None (it must not exceed it).

    Returns:
        Per prompt, up to `k` references, best first (fewer when the filter left fewer).
    """
    k = retriever.k if k is None else k
    if k > retriever.k:
        raise UserError(
            f"retrieval.k: RAG asked for {k} references, the retriever has k={retriever.k}"
        )
    found_ids, found_scores = retriever.search(list(prompts))
    ids = [[i for i in row.tolist() if i >= 0][:k] for row in found_ids]
    scores = [row.tolist() for row in found_scores]
    texts = reference_texts(retriever, [i for row in ids for i in row])
    return [
        [RetrievedReference(i, float(s), texts[i]) for i, s in zip(row, score, strict=False)]
        for row, score in zip(ids, scores, strict=True)
    ]


def rag_context(prompt: str, references: Sequence[str], *, template: str = RAG_TEMPLATE) -> str:
    """The RAG baseline's prompt: each reference's text, then the prompt.

    Args:
        prompt: The user's prompt.
        references: Reference texts, best first; they appear in this order.
        template: How one reference is laid out; `{text}` is replaced by its text.

    Returns:
        `"".join(template.format(text=r) for r in references) + prompt`.
    """
    return "".join(template.format(text=text) for text in references) + prompt


def reference_texts(retriever: Retriever, ids: Sequence[int]) -> dict[int, str]:
    """The texts of references, decoded from the token ids the store keeps.

    Args:
        retriever: The retriever over the bank (its store and tokenizer).
        ids: Reference ids; repeats are read once.

    Returns:
        Id -> text.
    """
    unique = sorted(set(ids))
    if not unique:
        return {}
    references = retriever.store.references(unique)
    decode = retriever.tokenizer.decode if retriever.tokenizer is not None else str
    return {i: decode(list(r.ids)) for i, r in zip(unique, references, strict=True)}


def rag_prefixes(
    retriever: Retriever, tokenizer: Tokenizer, queries: Sequence[str]
) -> list[list[int]]:
    """Token ids of the RAG baseline's context before each query: `k` references as text.

    One retrieval per query with the query's text (`rag_references`, leakage filter on), laid out by
    `rag_context`.

    Args:
        retriever: The retriever over the bank.
        tokenizer: Encodes the references' text.
        queries: `B` query texts.

    Returns:
        Per query, the token ids that precede it.
    """
    found = rag_references(retriever, list(queries))
    return [tokenizer.encode(rag_context("", [r.text for r in row])) for row in found]
