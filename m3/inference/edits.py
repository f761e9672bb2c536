"""Measuring knowledge edits: do a bank's answers follow its edited facts (paper §1, §7)?

`measure_edits` applies edits to a copy of a bank (`m3.bank.edit.edit_bank`) and asks each
edit's cloze question with memory before and after; the `edit` stage of a pipeline reports
the share answered with the new value.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from m3.bank.edit import EditSummary, edit_bank
from m3.core.errors import UserError

if TYPE_CHECKING:
    from m3.data.chunking import Chunker
    from m3.data.tokenizer import Tokenizer
    from m3.data.world import Edit
    from m3.inference.evaluate import ClozeScore
    from m3.memory.encoder import MemoryEncoder
    from m3.model.memory3 import Memory3


@dataclass(frozen=True)
class EditReport:
    """How well edits took effect: cloze accuracy on the edits' questions, with memory.

    Each question's correct option is the new value (the old one is among the others), so
    accuracy is the share of questions answered with the new value.

    Attributes:
        took_effect: Share answered with the new value after the edits.
        before: Share answered with the new value before them (the baseline).
        n: Questions (edits).
        after_score: The full score after (with its 95% interval and chance level).
        before_score: The full score before.
        summary: What the edits changed in the bank.
        bank: The edited copy of the bank.
    """

    took_effect: float
    before: float
    n: int
    after_score: ClozeScore
    before_score: ClozeScore
    summary: EditSummary
    bank: Path


def _cloze(
    folder: Path,
    model: Memory3,
    tokenizer: Tokenizer,
    questions: Sequence[Any],
    *,
    k: int,
    threshold: float | None,
) -> ClozeScore:
    from m3.bank.open import open_bank
    from m3.inference.evaluate import evaluate_cloze
    from m3.retrieval.retriever import Retriever

    bank = open_bank(folder)
    retriever = Retriever(
        embedder=bank.embedder, index=bank.index, store=bank.store, tokenizer=tokenizer,
        model=model, k=k, threshold=threshold, chunk_length=model.config.chunk_length,
        expected_embedder_fingerprint=str(bank.manifest["embedder"]["fingerprint"]),
        where=str(folder),
    )  # fmt: skip
    try:
        return evaluate_cloze(model, tokenizer, questions, retriever=retriever, modes=("memory",))[
            "memory"
        ]
    finally:
        retriever.close()
        bank.store.close()


def measure_edits(
    bank_folder: str | Path,
    edits: Sequence[Edit],
    *,
    model: Memory3,
    tokenizer: Tokenizer,
    work_dir: str | Path,
    k: int = 5,
    threshold: float | None = 2 / 3,
    chunker: Chunker | None = None,
    encoder: MemoryEncoder | None = None,
    sparsifier: nn.Module | None = None,
) -> EditReport:
    """Apply knowledge edits to a copy of a bank and measure whether the answers follow.

    The bank is copied to `work_dir/edited-bank` (the original stays as it is, e.g. for
    other evaluations); every edit's documents replace theirs in the copy. Each edit's
    cloze question is asked with memory before (original bank) and after (the copy).

    Args:
        bank_folder: The bank (its knowledge base holds the edited documents).
        edits: The edits (`World.edits(n)` or `m3.data.world.read_edits`).
        model: The weights that wrote the bank.
        tokenizer: The bank's tokenizer.
        work_dir: Where the edited copy goes (created if needed; an old copy is replaced).
        k: Memories per chunk.
        threshold: Leakage threshold of the retriever (None: off).
        chunker: Cuts the new texts (see `edit_bank`).
        encoder: The memory encoder (see `edit_bank`).
        sparsifier: The sparsifier (see `edit_bank`).

    Returns:
        The share of questions answered with the new value after and before.

    Raises:
        UserError: For no edits, or any error of `edit_bank`.
    """
    if not edits:
        raise UserError("no edits to measure")
    source = Path(bank_folder)
    questions = [e.question for e in edits]
    before = _cloze(source, model, tokenizer, questions, k=k, threshold=threshold)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "edited-bank"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(source, copy)
    summary = edit_bank(
        copy, model=model, tokenizer=tokenizer,
        replace=[d for e in edits for d in e.documents],
        chunker=chunker, encoder=encoder, sparsifier=sparsifier,
    )  # fmt: skip
    after = _cloze(copy, model, tokenizer, questions, k=k, threshold=threshold)
    return EditReport(
        took_effect=after.accuracy, before=before.accuracy, n=len(edits),
        after_score=after, before_score=before, summary=summary, bank=copy,
    )  # fmt: skip
