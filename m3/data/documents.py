"""Reading local text: plain-text files (one document each) or JSONL with a text field.

Used for training text and for knowledge bases alike. Empty or whitespace-only documents are
skipped and counted. Everything below is refused before any work starts (nothing is
tokenized), naming the file (and line):

- undecodable bytes and malformed JSON;
- a JSONL `id` that is neither a string nor an integer;
- two documents with the same id (`check_unique_ids`): the same JSONL `id` twice, in one
  file or in two; the number `1` and the string `"1"` (both are the id `'1'`); two
  plain-text files of the same name in different folders (`a/x.txt` and `b/x.txt`: a
  plain-text file's id is its file name, kept so for the ids of existing banks). A bank's
  documents are edited and deleted by id (`m3 edit`), so an id must name one document;
- a document of more than `max_document_bytes` bytes of UTF-8 text (`MAX_DOCUMENT_BYTES`,
  1,000,000, by default): split it, or raise the limit (`FilesSource(max_document_bytes=...)`,
  `init_args: {max_document_bytes: N}` of a recipe's `files` source).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from m3.core.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
#: Most bytes of UTF-8 text one document may hold, unless a source sets another limit.
MAX_DOCUMENT_BYTES = 1_000_000


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
        places: Where each document was read, for messages (`file:line`, or the file of a
            plain-text document), in the order of `documents`.
    """

    documents: list[Document] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: int = 0
    places: list[str] = field(default_factory=list)

    def placed(self) -> Iterator[tuple[Document, str]]:
        """Each document with where it was read (`document <n>` where `places` does not say)."""
        known = len(self.places) == len(self.documents)
        for number, document in enumerate(self.documents, 1):
            yield document, self.places[number - 1] if known else f"document {number}"

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


def iter_documents(
    path: Path, *, text_field: str = "text", max_document_bytes: int = MAX_DOCUMENT_BYTES
) -> Iterator[Document | None]:
    """The documents of one file; None stands for an empty document (skipped).

    Args:
        path: A `.jsonl` file (one JSON object per line, with `text_field` and an optional
            `id`, a string or an integer) or any other file (read whole as one UTF-8
            document, whose id is the file name).
        text_field: The JSONL field holding the text.
        max_document_bytes: Most bytes of UTF-8 text one document may hold.

    Yields:
        Documents, or None for empty ones.

    Raises:
        UserError: For undecodable bytes, malformed JSONL, an id of another type or a
            document longer than `max_document_bytes`, naming the file and line.
    """
    for _, document in _read_file(path, text_field, max_document_bytes):
        yield document


def _read_file(
    path: Path, text_field: str, max_document_bytes: int
) -> Iterator[tuple[str, Document | None]]:
    """`iter_documents`, each document with where it was read (`file:line` or `file`)."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if path.suffix not in JSONL_SUFFIXES:
        if not content.strip():
            yield str(path), None
            return
        check_document_size(str(path), path.name, content, max_document_bytes)
        yield f"{path} (a plain-text file: its id is its file name)", Document(path.name, content)
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        place = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{place}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{place}: expected an object with a string {text_field!r} field")
        text = record[text_field]
        if "id" in record:
            raw = record["id"]
            if isinstance(raw, bool) or not isinstance(raw, str | int):
                raise UserError(
                    f"{place}: the id must be a string or an integer, got {json.dumps(raw)}"
                )
            doc_id, place = str(raw), f'{place} ("id": {json.dumps(raw)})'
        else:
            doc_id, place = f"{path.name}:{number}", f"{place} (no id: named by file and line)"
        if not text.strip():
            yield place, None
            continue
        check_document_size(f"{path}:{number}", doc_id, text, max_document_bytes)
        yield place, Document(doc_id, text)


def check_document_size(
    place: str, doc_id: str, text: str, limit: int, *, raise_limit: str | None = None
) -> None:
    """Refuse a document of more than `limit` bytes of UTF-8 text, naming it.

    Args:
        place: Where it was read (a file and line).
        doc_id: Its id.
        text: Its text.
        limit: Most bytes allowed.
        raise_limit: How to raise the limit, for the message; a `files` source's
            `max_document_bytes` when None.

    Raises:
        UserError: For a longer document.
    """
    # a character is 1 to 4 bytes of UTF-8: encode only when the count alone cannot tell
    if len(text) <= limit // 4:
        return
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        how = raise_limit or (
            "the source's max_document_bytes (a recipe's `class_path: files` source: "
            "`init_args: {max_document_bytes: N}`)"
        )
        raise UserError(
            f"{place}: document {doc_id!r} holds {size:,} bytes of UTF-8 text, more than "
            f"the limit of {limit:,} bytes per document: split it into smaller documents, or "
            f"raise the limit with {how}"
        )


def check_unique_ids(documents: Iterable[tuple[str, str]]) -> None:
    """Refuse two documents with the same id, naming where both were read.

    Args:
        documents: `(id, place)` of each document, `place` saying where it was read (a
            `Corpus`'s `places`).

    Raises:
        UserError: At the first id given twice, naming both places.
    """
    seen: dict[str, str] = {}
    for doc_id, place in documents:
        if doc_id in seen:
            raise UserError(
                f"document id {doc_id!r} is given twice: at {seen[doc_id]} and at {place}; every "
                "document needs its own id (m3 edit replaces and deletes a bank's documents "
                "by id): give one of them another id (or rename one of the files)"
            )
        seen[doc_id] = place


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


def read_corpus(
    paths: Sequence[str | Path],
    *,
    text_field: str = "text",
    max_document_bytes: int = MAX_DOCUMENT_BYTES,
) -> Corpus:
    """Read every document of some files and directories.

    Args:
        paths: Files or directories (see `expand_paths`).
        text_field: The JSONL field holding the text.
        max_document_bytes: Most bytes of UTF-8 text one document may hold.

    Returns:
        The corpus; empty documents are counted in `skipped`.

    Raises:
        UserError: For missing paths, unreadable files, two documents with the same id, a
            document longer than `max_document_bytes`, or when no document has any text.
    """
    corpus = Corpus(files=expand_paths(paths))
    for path in corpus.files:
        for place, document in _read_file(path, text_field, max_document_bytes):
            if document is None:
                corpus.skipped += 1
            else:
                corpus.documents.append(document)
                corpus.places.append(place)
    check_unique_ids((d.id, place) for d, place in corpus.placed())
    if not corpus.documents:
        names = ", ".join(str(p) for p in corpus.files)
        raise UserError(f"no text in {names} ({corpus.skipped} empty documents skipped)")
    return corpus
