"""Text sources: where training text, held-out text and knowledge bases come from.

A recipe lists sources for each role; their documents are concatenated in order:

```yaml
data:
  train:
    - {class_path: files, init_args: {paths: [corpus/]}}   # your own .txt / .jsonl files
    - {class_path: stdlib}                                   # English from Python's stdlib
  knowledge:
    - {class_path: world, init_args: {split: kb}}            # the synthetic test world
```

Subclass `TextSource` to read anything else (a database, a dataset on disk) and name your
class by dotted path in a recipe. Sources stream: `documents()` returns an iterator (a list
does too), and a knowledge base is read more than once — checked, then cut into references
(`m3.bank.knowledge`) — each time by a new call, so no stage holds all its texts at once. A
`files` source reads one file at a time.

The documents of one role (`data.train`, `data.val`, `data.knowledge`) must have distinct
ids, across all of its sources (`m3.data.documents.check_unique_ids`). A `files` source
refuses a document of more than `max_document_bytes` bytes of UTF-8 text (1,000,000 by
default), naming it, before anything is tokenized:

```yaml
    - {class_path: files, init_args: {paths: [books/], max_document_bytes: 20000000}}
```
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np

from m3.core.errors import UserError
from m3.core.registry import Bounds, InputPath
from m3.data.documents import (
    MAX_DOCUMENT_BYTES,
    Corpus,
    Document,
    check_unique_ids,
    expand_paths,
    iter_documents,
    read_corpus,
)

if TYPE_CHECKING:
    from m3.data.world import World


class SeenIds:
    """The ids of a stream of documents, 8 bytes each: `check_unique_ids` in bounded memory.

    Each id is kept as its 64-bit `hash()` (stable within one process). Only when two
    digests are equal is the stream read again, keeping just the documents whose digest
    repeats, to name both places with `check_unique_ids`'s message.
    """

    def __init__(self) -> None:
        self._digests = array("q")

    def __len__(self) -> int:
        return len(self._digests)

    def add(self, doc_id: object) -> None:
        """Record one document's id.

        Args:
            doc_id: The id.
        """
        self._digests.append(hash(doc_id))

    def check(self, again: Callable[[], Iterable[tuple[str, str]]], *, start: int = 0) -> None:
        """Refuse an id given twice among those added from `start` on.

        Args:
            again: Streams `(id, place)` of those documents once more, in the same order
                (called only when two digests are equal).
            start: The first id to check (those of one source among several).

        Raises:
            UserError: `check_unique_ids`'s error for the first id given twice.
        """
        digests = np.sort(np.array(self._digests[start:], dtype=np.int64))
        repeated = digests[1:][digests[1:] == digests[:-1]]
        if repeated.size:
            suspects = set(repeated.tolist())
            check_unique_ids((i, place) for i, place in again() if hash(i) in suspects)


class TextSource(ABC):
    """Something that yields documents."""

    @abstractmethod
    def documents(self) -> Iterable[Document]:
        """The source's documents, in a deterministic order.

        Returns:
            Non-empty documents, streamed (an iterator; a list does too). Every call reads
            them anew: a knowledge base is read more than once.
        """

    def describe(self) -> str:
        """One line naming the source (for logs and reports)."""
        return type(self).__name__

    def placed(self) -> Iterator[tuple[str, Document | None]]:
        """The documents, streamed, each with where it was read (for messages).

        Raises what `documents()` raises for malformed input; the checks of the whole
        source (a `files` source's distinct ids) are `check_whole`'s.

        Yields:
            `(place, document)`: the place is the document's position in this source
            (`FilesSource` names the file and line); None stands for an empty document
            that was skipped.
        """
        where = self.describe()
        for number, document in enumerate(self.documents(), 1):
            yield f"{where}, document {number} (id {document.id!r})", document

    def check_whole(self, seen: SeenIds, skipped: int, *, start: int = 0) -> None:  # noqa: B027
        """The checks of the whole source, after one pass over `placed()`: none by default.

        Args:
            seen: The ids of the pass (this source's from `start` on).
            skipped: Empty documents the pass skipped.
            start: Where this source's ids begin in `seen`.
        """

    def read(self) -> Corpus:
        """The documents with where each came from (for messages) and what was skipped.

        Returns:
            `documents()` as lists, each placed as its position in this source (`FilesSource`
            names the file and line).
        """
        corpus = Corpus()
        for place, document in self.placed():
            if document is None:
                corpus.skipped += 1
            else:
                corpus.documents.append(document)
                corpus.places.append(place)
        return corpus


class FilesSource(TextSource):
    """Plain-text files (one document each) and JSONL files with a text field.

    A plain-text file's id is its file name; a JSONL line's is its `id` (a string or an
    integer), or `<file name>:<line>` without one. Ids must be distinct, and a document may
    hold at most `max_document_bytes` bytes of UTF-8 text: both are checked, naming the file
    and line, before anything is tokenized.

    Args:
        paths: Files or directories (their `.txt`, `.md` and `.jsonl` files, recursively).
        text_field: The JSONL field holding the text.
        max_document_bytes: Most bytes of UTF-8 text one document may hold (a longer one is
            refused, naming it): a guard against a whole corpus on one line, which would
            be tokenized as one string.
    """

    def __init__(
        self,
        paths: list[InputPath],
        *,
        text_field: str = "text",
        max_document_bytes: Annotated[int, Bounds(ge=1)] = MAX_DOCUMENT_BYTES,
    ) -> None:
        if not paths:
            raise UserError("paths must name at least one file or directory")
        if max_document_bytes < 1:
            raise UserError(f"max_document_bytes must be at least 1, got {max_document_bytes}")
        self.paths = [Path(p) for p in paths]
        self.text_field = text_field
        self.max_document_bytes = max_document_bytes

    def documents(self) -> Iterator[Document]:
        """Stream the files' documents, one file read at a time (see `read_corpus`).

        Malformed input is refused when its file is reached; after the last document, the
        same checks as `read_corpus`: distinct ids, and some text.
        """
        seen, skipped = SeenIds(), 0
        for _, document in self.placed():
            if document is None:
                skipped += 1
                continue
            seen.add(document.id)
            yield document
        self.check_whole(seen, skipped)

    def placed(self) -> Iterator[tuple[str, Document | None]]:
        """The files' documents with their file, one file read at a time.

        (`read()` also names each document's line, for messages.)

        Yields:
            `(file, document)`, None for an empty document.
        """
        for path in expand_paths(self.paths):
            for document in iter_documents(
                path, text_field=self.text_field, max_document_bytes=self.max_document_bytes
            ):
                yield str(path), document

    def check_whole(self, seen: SeenIds, skipped: int, *, start: int = 0) -> None:
        """Refuse an id given twice, and files without text, as `read_corpus` does.

        Args:
            seen: The ids of a pass over `placed()` (this source's from `start` on).
            skipped: Empty documents the pass skipped.
            start: Where this source's ids begin in `seen`.

        Raises:
            UserError: For an id given twice (naming both places: the files are read again,
                by `read_corpus`, only then) or no text at all.
        """
        seen.check(lambda: ((d.id, p) for d, p in self.read().placed()), start=start)
        if len(seen) == start:
            names = ", ".join(str(p) for p in expand_paths(self.paths))
            raise UserError(f"no text in {names} ({skipped} empty documents skipped)")

    def read(self) -> Corpus:
        """Read the files, with the file and line of each document and the count skipped."""
        return read_corpus(
            self.paths, text_field=self.text_field, max_document_bytes=self.max_document_bytes
        )

    def describe(self) -> str:
        """The paths read."""
        return "files " + ", ".join(str(p) for p in self.paths)


class WorldSource(TextSource):
    """One part of the synthetic test world (`m3.data.world`), generated in memory.

    Args:
        split: "train" (training text), "heldout" (held-out text), or "kb" (the knowledge
            base, one or two facts per document).
        seed: The world's seed.
        n_people: People in the world.
        n_places: Places in the world.
        n_orgs: Organisations in the world.
    """

    def __init__(
        self,
        split: Literal["train", "heldout", "kb"] = "train",
        *,
        seed: Annotated[int, Bounds(ge=0)] = 0,
        n_people: Annotated[int, Bounds(ge=1)] = 2400,
        n_places: Annotated[int, Bounds(ge=1)] = 800,
        n_orgs: Annotated[int, Bounds(ge=1)] = 800,
    ) -> None:
        if split not in ("train", "heldout", "kb"):
            raise UserError(f"split must be 'train', 'heldout' or 'kb', got {split!r}")
        self.split, self.seed = split, seed
        self.sizes = {"n_people": n_people, "n_places": n_places, "n_orgs": n_orgs}

    def world(self) -> World:
        """The generated world (deterministic for the seed and sizes)."""
        from m3.data.world import World

        return World.generate(self.seed, **self.sizes)

    def documents(self) -> Iterator[Document]:
        """The split's documents (the world is generated in memory, then streamed)."""
        world = self.world()
        if self.split == "kb":
            return iter(world.knowledge_base())
        if self.split == "heldout":
            return iter(world.heldout_documents())
        return iter(world.training_documents())

    def describe(self) -> str:
        """The split, seed and sizes."""
        return f"world {self.split} (seed {self.seed}, {self.sizes})"


class StdlibSource(TextSource):
    """English text that every Python installation carries (`m3.data.stdlib_text`).

    Args:
        max_chars: Most characters taken.
    """

    def __init__(self, *, max_chars: Annotated[int, Bounds(ge=1)] = 1_000_000) -> None:
        self.max_chars = max_chars

    def documents(self) -> Iterator[Document]:
        """Help topics and module docstrings of the standard library."""
        from m3.data.stdlib_text import stdlib_documents

        return iter(stdlib_documents(max_chars=self.max_chars))

    def describe(self) -> str:
        """The character cap."""
        return f"standard-library text (≤ {self.max_chars:,} characters)"


def gather(sources: list[TextSource]) -> list[Document]:
    """Concatenate the documents of several sources.

    Args:
        sources: The sources, in order.

    Returns:
        Their documents.

    Raises:
        UserError: When the sources hold no document at all, or two documents with the same
            id (naming where both were read).
    """
    corpora = [source.read() for source in sources]
    documents = [d for corpus in corpora for d in corpus.documents]
    check_unique_ids((d.id, place) for corpus in corpora for d, place in corpus.placed())
    if not documents:
        raise UserError("no documents in " + "; ".join(s.describe() for s in sources))
    return documents
