"""A user's chunker, named in a recipe by its dotted path (docs/guides/recipes.md)."""

from __future__ import annotations

from typing import Annotated

from m3.core.registry import Bounds, InputPath
from m3.data.chunking import FixedChunker


class GlossaryChunker(FixedChunker):
    """Fixed spans, with a glossary of terms never to split (an illustration)."""

    def __init__(
        self,
        max_tokens: Annotated[int, Bounds(ge=8, le=4096)] = 128,
        *,
        glossary: InputPath | None = None,
    ) -> None:
        super().__init__(max_tokens)
        self.glossary = glossary
