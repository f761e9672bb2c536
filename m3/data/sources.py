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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from m3.core.errors import UserError
from m3.core.registry import Bounds, InputPath
from m3.data.documents import Document, read_corpus

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


class FilesSource(TextSource):
    """Plain-text files (one document each) and JSONL files with a text field.

    Args:
        paths: Files or directories (their `.txt`, `.md` and `.jsonl` files, recursively).
        text_field: The JSONL field holding the text.
    """

    def __init__(self, paths: list[InputPath], *, text_field: str = "text") -> None:
        if not paths:
            raise UserError("paths must name at least one file or directory")
        self.paths = [Path(p) for p in paths]
        self.text_field = text_field

    def documents(self) -> list[Document]:
        """Read the files (see `m3.data.documents.read_corpus`)."""
        return read_corpus(self.paths, text_field=self.text_field).documents

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
        UserError: When the sources hold no document at all.
    """
    documents = [d for source in sources for d in source.documents()]
    if not documents:
        raise UserError("no documents in " + "; ".join(s.describe() for s in sources))
    return documents
