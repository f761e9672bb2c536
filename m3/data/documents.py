"""Reading local text: plain-text files (one document each) or JSONL with a text field.

Used for training text and for knowledge bases alike. Empty or whitespace-only documents are
skipped and counted; undecodable bytes and malformed JSON are reported with the file (and
line) name, before any work starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from m3.core.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


class Document(NamedTuple):
    """One document.

    Attributes:
        id: A stable identifier: the JSONL `id` field, or `file:line` / the file name.
        text: The text.
    """

    id: str
    text: str


@dataclass
class Corpus:
    """Documents read from files, and what was skipped.

    Attributes:
        documents: The non-empty documents, in file order.
        files: The files read.
        skipped: Empty or whitespace-only documents left out.
    """

    documents: list[Document] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: int = 0

    @property
    def characters(self) -> int:
        """Total characters of the documents."""
        return sum(len(d.text) for d in self.documents)


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus the text and JSONL files inside named directories.

    Args:
        paths: Files or directories.

    Returns:
        The files, directories expanded in sorted order.

    Raises:
        UserError: For a path that does not exist, or a directory without text files.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
            if not found:
                raise UserError(f"{path}: no .txt, .md or .jsonl files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return files


def iter_documents(path: Path, *, text_field: str = "text") -> Iterator[Document | None]:
    """The documents of one file; None stands for an empty document (skipped).

    Args:
        path: A `.jsonl` file (one JSON object per line, with `text_field` and an optional
            `id`) or any other file (read whole as one UTF-8 document).
        text_field: The JSONL field holding the text.

    Yields:
        Documents, or None for empty ones.

    Raises:
        UserError: For undecodable bytes or malformed JSONL, naming the file and line.
    """
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if path.suffix not in JSONL_SUFFIXES:
        yield Document(path.name, content) if content.strip() else None
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(
                f"{path}:{number}: expected an object with a string {text_field!r} field"
            )
        text = record[text_field]
        doc_id = str(record.get("id", f"{path.name}:{number}"))
        yield Document(doc_id, text) if text.strip() else None


def read_jsonl(
    path: str | Path, keys: Sequence[str], *, text_keys: Sequence[str] = ()
) -> list[dict]:
    """Read a JSON Lines file of objects that must hold some keys (blank lines skipped).

    Args:
        path: The file.
        keys: Keys every object must have.
        text_keys: Those of `keys` whose values must be strings.

    Returns:
        The objects, in file order.

    Raises:
        UserError: For a missing file, a line that is not JSON, or an object without one of
            `keys` or with a non-string value of `text_keys` (naming the file and line).
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"no such file: {file}")
    rows = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{file}:{number}: not valid JSON ({error.msg})") from None
            missing = [k for k in keys if not isinstance(row, dict) or k not in row]
            if missing:
                raise UserError(f"{file}:{number}: missing key(s) {missing}; expected {list(keys)}")
            for key in text_keys:
                if not isinstance(row[key], str):
                    raise UserError(f"{file}:{number}: {key!r} must be a string")
            rows.append(row)
    return rows


def read_corpus(paths: Sequence[str | Path], *, text_field: str = "text") -> Corpus:
    """Read every document of some files and directories.

    Args:
        paths: Files or directories (see `expand_paths`).
        text_field: The JSONL field holding the text.

    Returns:
        The corpus; empty documents are counted in `skipped`.

    Raises:
        UserError: For missing paths, unreadable files, or when no document has any text.
    """
    corpus = Corpus(files=expand_paths(paths))
    for path in corpus.files:
        for document in iter_documents(path, text_field=text_field):
            if document is None:
                corpus.skipped += 1
            else:
                corpus.documents.append(document)
    if not corpus.documents:
        names = ", ".join(str(p) for p in corpus.files)
        raise UserError(f"no text in {names} ({corpus.skipped} empty documents skipped)")
    return corpus
