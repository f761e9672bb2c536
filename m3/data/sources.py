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
class by dotted path in a recipe.

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
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from m3.core.errors import UserError
from m3.core.registry import Bounds, InputPath
from m3.data.documents import MAX_DOCUMENT_BYTES, Corpus, Document, check_unique_ids, read_corpus

if TYPE_CHECKING:
    from m3.data.world import World


class TextSource(ABC):
    """Something that yields documents."""

    @abstractmethod
    def documents(self) -> list[Document]:
        """The source's documents, in a deterministic order.

        Returns:
            Non-empty documents.
        """

    def describe(self) -> str:
        """One line naming the source (for logs and reports)."""
        return type(self).__name__

    def read(self) -> Corpus:
        """The documents with where each came from (for messages) and what was skipped.

        Returns:
            `documents()`, each placed as its position in this source (`FilesSource` names
            the file and line).
        """
        documents = self.documents()
        where = self.describe()
        places = [f"{where}, document {i} (id {d.id!r})" for i, d in enumerate(documents, 1)]
        return Corpus(documents=documents, places=places)


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

    def documents(self) -> list[Document]:
        """Read the files (see `m3.data.documents.read_corpus`)."""
        return self.read().documents

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

    def documents(self) -> list[Document]:
        """The split's documents."""
        world = self.world()
        if self.split == "kb":
            return world.knowledge_base()
        if self.split == "heldout":
            return world.heldout_documents()
        return world.training_documents()

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

    def documents(self) -> list[Document]:
        """Help topics and module docstrings of the standard library."""
        from m3.data.stdlib_text import stdlib_documents

        return stdlib_documents(max_chars=self.max_chars)

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
