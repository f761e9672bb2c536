"""`RecipeError`: everything wrong with a recipe, reported together."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from m3.core.errors import UserError
from m3.core.values import Problem


class RecipeError(UserError):
    """Everything wrong with a recipe, reported together.

    Args:
        problems: Each problem with its key path.
        sources: The recipe files (and overrides) the problems were found in.

    Attributes:
        problems: Each problem with its key path.
    """

    def __init__(self, problems: Sequence[Problem], *, sources: str = "the recipe") -> None:
        self.problems = list(problems)
        self.sources = sources
        count = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in {sources}:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); this one is rebuilt from its problems instead.
        return (functools.partial(RecipeError, sources=self.sources), (self.problems,))
