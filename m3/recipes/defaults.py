"""The parts m3 uses when a recipe leaves them unset, defined once.

Every command that needs a part the recipe does not name builds the same one, from the
spec `default_spec` gives (`m3.recipes.build(recipe, kind)` does it for you):

- `chunker`: `fixed`, `max_tokens` = `model.reference_length`, so that the continual
  stage's pairing and the bank cut the knowledge base into the same references, with the
  same ids;
- `encoder`: `memory` (`MemoryEncoder()`): a reference encoded on its own, its tokens scored
  as in paper §3.3;
- `sparsifier`: `top_k`, `k` = `model.memory_tokens`: the top tokens per memory layer and
  key/value head (paper §3.3);
- `embedder`: `hashed_ngram` (`HashedNgramEmbedder()`): fast, dependency-free retrieval
  (paper §3.1);
- `index`: `exact`, or `scann` above `SCANN_ABOVE` references.

The defaults are specs by short name, so that this module imports no component: the
registry builds them (`m3.core.registry.instantiate`), with the arguments that the calling
code supplies (an index's `dim`).

`TRAINER` holds m3's defaults of Lightning `Trainer` options (`trainer:`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from m3.core.errors import UserError
from m3.core.registry import ComponentSpec

if TYPE_CHECKING:
    from m3.model.config import Config

#: Knowledge bases with more references than this get a `ScannIndex`, smaller ones an exact one.
SCANN_ABOVE = 200_000

#: The kinds that have a default (a recipe must name the others: tokenizer, store, quantizer,
#: sources).
KINDS = ("chunker", "encoder", "sparsifier", "embedder", "index")

#: m3's defaults of Lightning `Trainer` options. Every recipe writes them out (they are part
#: of its fingerprint, `m3.core.runs.recipe_fingerprint`); Lightning's own defaults apply to
#: the options not listed, and those that are None here.
TRAINER: Mapping[str, Any] = MappingProxyType(
    {
        "max_steps": 1000,
        "accelerator": "auto",
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",
        "precision": None,
        "accumulate_grad_batches": 1,
        "gradient_clip_val": 1.0,
        "val_check_interval": None,
        "limit_val_batches": None,
        "log_every_n_steps": 10,
        "enable_progress_bar": True,
        "deterministic": None,
    }
)


def default_spec(
    kind: str, config: Config | None = None, *, references: int | None = None
) -> ComponentSpec:
    """The part of a kind that m3 uses when a recipe names none.

    Args:
        kind: One of `KINDS`.
        config: The model's configuration; the chunker and the sparsifier follow it.
        references: How many references the index will hold (kind `index` only).

    Returns:
        The spec, by short name; build it with `m3.core.registry.instantiate`.

    Raises:
        UserError: For a kind without a default, or a chunker or sparsifier without the
            model's `config`.
    """
    if kind in ("chunker", "sparsifier") and config is None:
        raise UserError(f"the default {kind} follows the model: give its config")
    if kind == "chunker":
        assert config is not None
        return ComponentSpec("fixed", {"max_tokens": config.reference_length})
    if kind == "encoder":
        return ComponentSpec("memory", {})
    if kind == "sparsifier":
        assert config is not None
        return ComponentSpec("top_k", {"k": config.memory_tokens})
    if kind == "embedder":
        return ComponentSpec("hashed_ngram", {})
    if kind == "index":
        large = references is not None and references > SCANN_ABOVE
        return ComponentSpec("scann" if large else "exact", {})
    raise UserError(
        f"m3 has no default {kind}: a recipe names it (kinds with a default: {', '.join(KINDS)})"
    )
