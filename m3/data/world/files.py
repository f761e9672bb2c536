"""Cloze questions and knowledge edits, and the JSON Lines files that hold them.

`ClozeQuestion` and `Edit` are what a `World` hands out and what `World.write` writes
(`cloze.jsonl`, `edits.jsonl`, one `question_row` / `edit_row` per line); `read_cloze` and
`read_edits` read such files back, a world's or your own, for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from m3.core.errors import UserError
from m3.data.documents import Document, read_jsonl

#: Options per cloze question unless asked otherwise (chance level 25%).
DEFAULT_OPTIONS = 4


class ClozeQuestion(NamedTuple):
    """A multiple-choice cloze question whose answer only the knowledge base holds.

    A model is asked which option most likely continues `prompt`; options begin with a
    space, so `prompt + options[i]` is the natural text.

    Attributes:
        prompt: Text that ends right before the answer, e.g. `"Velmora Quist worked as a"`.
        options: The candidate continuations, e.g. `(" potter", " tailor", ...)`.
        answer: Index of the correct option.
        entity: Id of the entity asked about.
        attribute: The attribute asked for, e.g. `"occupation"`.
        kb_ids: Ids of the knowledge-base documents that state the answer.
    """

    prompt: str
    options: tuple[str, ...]
    answer: int
    entity: str
    attribute: str
    kb_ids: tuple[str, ...]

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess: `1 / len(options)`."""
        return 1.0 / len(self.options)

    @property
    def answer_text(self) -> str:
        """The correct option."""
        return self.options[self.answer]


class Edit(NamedTuple):
    """A knowledge edit: one fact of a held-out entity changed in the knowledge base.

    Replacing the knowledge-base documents with the same ids by `documents` (and re-encoding
    their memories) should make a model that reads its memories answer `question` with
    `new`, although the question also offers `old`.

    Attributes:
        entity: Id of the edited entity.
        attribute: The edited attribute.
        old: The value before the edit, as written in the text.
        new: The value after the edit.
        documents: The replacement knowledge-base documents (same ids as the ones replaced).
        question: A cloze question whose correct option is `" " + new`; `" " + old` is among
            the distractors.
    """

    entity: str
    attribute: str
    old: str
    new: str
    documents: tuple[Document, ...]
    question: ClozeQuestion


def question_row(question: ClozeQuestion) -> dict:
    """A question as one line of `cloze.jsonl` holds it (lists instead of tuples).

    Args:
        question: The question.

    Returns:
        Its fields as JSON-serialisable values.
    """
    row = question._asdict()
    row["options"] = list(question.options)
    row["kb_ids"] = list(question.kb_ids)
    return row


def edit_row(edit: Edit) -> dict:
    """An edit as one line of `edits.jsonl` holds it (documents and question as mappings).

    Args:
        edit: The edit.

    Returns:
        Its fields as JSON-serialisable values.
    """
    row = edit._asdict()
    row["documents"] = [d._asdict() for d in edit.documents]
    row["question"] = question_row(edit.question)
    return row


def _question_from(row: dict) -> ClozeQuestion:
    return ClozeQuestion(
        prompt=row["prompt"],
        options=tuple(row["options"]),
        answer=int(row["answer"]),
        entity=row["entity"],
        attribute=row["attribute"],
        kb_ids=tuple(row["kb_ids"]),
    )


def read_cloze(path: str | Path) -> list[ClozeQuestion]:
    """Read cloze questions from a JSON Lines file such as `cloze.jsonl`.

    Each line holds `prompt`, `options` (strings, each starting with a space), `answer`
    (index of the correct option), `entity`, `attribute` and `kb_ids`; write your own
    questions in that form to evaluate on your own knowledge base.

    Args:
        path: The file.

    Returns:
        The questions, in file order.

    Raises:
        UserError: When the file is missing, a line lacks a key, or an answer index is out
            of range.
    """
    keys = ("prompt", "options", "answer", "entity", "attribute", "kb_ids")
    questions = [_question_from(row) for row in read_jsonl(path, keys)]
    for number, q in enumerate(questions, 1):
        if not 0 <= q.answer < len(q.options):
            raise UserError(
                f"{path}: question {number} has answer {q.answer} but {len(q.options)} options"
            )
    return questions


def read_edits(path: str | Path) -> list[Edit]:
    """Read knowledge edits from a JSON Lines file such as `edits.jsonl`.

    Args:
        path: The file.

    Returns:
        The edits, in file order.

    Raises:
        UserError: When the file is missing or a line lacks a key.
    """
    keys = ("entity", "attribute", "old", "new", "documents", "question")
    return [
        Edit(
            row["entity"],
            row["attribute"],
            row["old"],
            row["new"],
            tuple(Document(d["id"], d["text"]) for d in row["documents"]),
            _question_from(row["question"]),
        )
        for row in read_jsonl(path, keys)
    ]
