"""A model with its memory bank, loaded and checked to belong together.

`load_inference` opens everything inference needs from a recipe (or a bank or run folder)
and checks that the parts belong together: the bank's memories were written by these
weights and this tokenizer, its index by its embedder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from m3.core.errors import UserError

if TYPE_CHECKING:
    from m3.bank.open import Bank
    from m3.data.tokenizer import Tokenizer
    from m3.model.memory3 import Memory3
    from m3.recipes import Recipe
    from m3.retrieval.retriever import Retriever


@dataclass
class Inference:
    """A model with its tokenizer and the retriever over its memory bank, checked to fit.

    Build one with `load_inference`. `close` (or a `with` block) closes the bank's files.

    Attributes:
        model: The model, in eval mode, without gradients.
        tokenizer: The tokenizer the bank's references were written with.
        retriever: Embedder + index + store + RAM cache + leakage filter over the bank.
        bank: The opened bank (store, index, embedder, manifest).
        prefix: `(b,)` long ids of the reference prefix `<s>Reference:`, on the model's device.
        recipe: The recipe everything was read from.
        weights: The weights file (or Hugging Face folder) loaded into the model.
    """

    model: Memory3
    tokenizer: Tokenizer
    retriever: Retriever
    bank: Bank
    prefix: Tensor
    recipe: Recipe
    weights: Path

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.model.lm_head.weight.device

    def close(self) -> None:
        """Stop the retriever's reader thread and close the bank's store."""
        self.retriever.close()
        self.bank.store.close()

    def __enter__(self) -> Inference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_source(
    source: Recipe | str | Path, overrides: Sequence[str]
) -> tuple[Recipe, Path | None, Path | None]:
    """The recipe, plus the bank or weights that a folder given as source stands for."""
    from m3.bank.layout import MANIFEST
    from m3.recipes import Recipe, load_recipe

    if isinstance(source, Recipe):
        if overrides:
            raise UserError("overrides apply to a recipe file or folder, not to a loaded recipe")
        return source, None, None
    path = Path(source)
    if path.is_file():
        return load_recipe(path, overrides), None, None
    if not path.is_dir():
        raise UserError(f"{path}: no such recipe file, bank folder or run folder")
    if not (path / "recipe.yaml").is_file():
        raise UserError(f"{path} is not a run folder of m3 (it has no recipe.yaml)")
    recipe = load_recipe(path / "recipe.yaml", overrides)
    if (path / MANIFEST).is_file():
        return recipe, path, None
    if (path / "model.pt").is_file():
        return recipe, None, path / "model.pt"
    raise UserError(f"{path} holds neither a memory bank (manifest.json) nor weights (model.pt)")


def _weights_path(path: str | Path, key: str) -> Path:
    path = Path(path)
    if path.is_dir() and (path / "model.pt").is_file():  # a stage's run folder
        return path / "model.pt"
    if not path.exists():
        raise UserError(f"{key}: {path} does not exist (train the model first?)")
    return path


def load_inference(
    source: Recipe | str | Path,
    *,
    overrides: Sequence[str] = (),
    bank: str | Path | None = None,
    weights: str | Path | None = None,
    k: int | None = None,
    threshold: float | Literal["recipe"] | None = "recipe",
    cache_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Inference:
    """Open a model, its tokenizer and its memory bank for inference, checked to fit.

    What comes from where:

    - the recipe: `source` itself, a recipe file, or the `recipe.yaml` of a folder: a bank
      folder (`m3 build-memory`) also names the bank, a stage's run folder (`m3 fit`) the
      weights (its `model.pt`);
    - the bank: `bank`, else `retrieval.bank`, else the folder given as `source`;
    - the weights: `weights`, else the run folder's `model.pt`, else
      `training.init_weights`, else the weights that wrote the bank (its recipe's
      `training.init_weights`); a run folder stands for its `model.pt`;
    - retrieval settings: the arguments, else the recipe's `retrieval:` section, else
      its defaults (k 5, threshold 2/3, over-fetch 3, a cache of 4096 references).

    Checks, each a `UserError` naming the recipe key to change: the tokenizer fits the
    model's vocabulary and is the one the bank was written with (same fingerprint and
    reference prefix); the model's settings and weights are the ones that wrote the memories
    (the store's model fingerprint); the saved embedder is the one that built the index; `k`
    is at most the number of references.

    Args:
        source: A checked recipe, a recipe file, a bank folder or a stage's run folder.
        overrides: `key=value` overrides applied to a recipe file or a folder's recipe.
        bank: The bank folder; overrides `retrieval.bank`.
        weights: A `model.pt`, a Lightning `.ckpt`, a Hugging Face folder or a run folder;
            overrides the recipe.
        k: Memories per chunk (and RAG references); overrides `retrieval.k`.
        threshold: Leakage threshold; None turns the filter off; "recipe" keeps
            `retrieval.threshold`.
        cache_size: References the RAM cache keeps; overrides `retrieval.cache_size`.
        device: Where the model runs (the CPU when None).
        dtype: The model's dtype (its parameters' as loaded, fp32, when None).

    Returns:
        The `Inference` bundle.

    Raises:
        UserError: For a missing bank or weights, or parts that do not belong together.
    """
    from m3.bank.open import open_bank
    from m3.model.checkpoints import load_weights
    from m3.model.memory3 import Memory3
    from m3.recipes import RetrievalSection, build_tokenizer, load_recipe
    from m3.retrieval.retriever import Retriever

    recipe, folder_bank, folder_weights = _resolve_source(source, overrides)
    settings = recipe.retrieval or RetrievalSection()
    bank_path = bank if bank is not None else settings.bank
    if bank_path is None:
        bank_path = folder_bank
    if bank_path is None:
        raise UserError(
            "retrieval.bank: name the memory bank folder that m3 build-memory wrote "
            "(e.g. retrieval.bank=runs/tiny/bank)"
        )
    bank_path = Path(bank_path)
    if not bank_path.is_dir():
        raise UserError(f"retrieval.bank: {bank_path} does not exist (run m3 build-memory first?)")
    if weights is not None:
        weights_path = _weights_path(weights, "weights")
    elif folder_weights is not None:
        weights_path = folder_weights
    elif recipe.training.init_weights is not None:
        weights_path = _weights_path(recipe.training.init_weights, "training.init_weights")
    else:
        writer = None
        if (bank_path / "recipe.yaml").is_file():
            writer = load_recipe(bank_path / "recipe.yaml").training.init_weights
        if writer is None:
            raise UserError(
                "training.init_weights: name the model's weights (a stage's run folder or its "
                "model.pt); the bank's recipe does not name the weights that wrote it"
            )
        weights_path = _weights_path(writer, f"training.init_weights (from {bank_path})")
    if recipe.tokenizer is None:
        raise UserError("tokenizer: inference needs the tokenizer the bank was written with")

    config = recipe.model.config()
    tokenizer = build_tokenizer(recipe)
    try:
        opened = open_bank(bank_path)
    except UserError as error:
        raise UserError(f"retrieval.bank: {error}") from None
    try:
        info = opened.store.info
        if info.tokenizer_fingerprint and info.tokenizer_fingerprint != tokenizer.fingerprint():
            raise UserError(
                f"tokenizer: {bank_path} was written with tokenizer "
                f"{info.tokenizer_fingerprint[:16]}, the recipe's {type(tokenizer).__name__} "
                f"has fingerprint {tokenizer.fingerprint()[:16]}"
            )
        prefix_ids = tokenizer.reference_prefix()
        if info.reference_prefix and list(info.reference_prefix) != prefix_ids:
            raise UserError(
                f"tokenizer: {bank_path} was written with the reference prefix "
                f"{list(info.reference_prefix)}, the tokenizer's is {prefix_ids}"
            )
        written = {k: v for k, v in info.model_config.items() if k != "name"}
        ours = {k: v for k, v in config.to_dict().items() if k != "name"}
        differ = [k for k in sorted(set(written) | set(ours)) if written.get(k) != ours.get(k)]
        if written and differ:
            shown = ", ".join(
                f"model.{k} is {ours.get(k)!r}, the bank's {written.get(k)!r}" for k in differ
            )
            raise UserError(
                f"model: {bank_path} was written by a model with other settings: {shown}"
            )
        model = Memory3(config)
        load_weights(model, weights_path)
        model = model.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
        try:
            opened.store.info.check_model(
                config.memory_shape, model.memory_fingerprint(), where=str(bank_path)
            )
        except UserError as error:
            raise UserError(f"training.init_weights: {weights_path}: {error}") from None
        k = settings.k if k is None else k
        stored = len(opened.store)
        if isinstance(k, int) and not isinstance(k, bool) and k > stored:
            raise UserError(
                f"retrieval.k: k={k} references per chunk asked for, but the bank {bank_path} "
                f"holds only {stored} reference{'s' if stored != 1 else ''}"
            )
        try:
            retriever = Retriever(
                embedder=opened.embedder,
                index=opened.index,
                store=opened.store,
                tokenizer=tokenizer,
                k=k,
                threshold=settings.threshold if threshold == "recipe" else threshold,
                overfetch=settings.overfetch,
                cache_size=settings.cache_size if cache_size is None else cache_size,
                min_score=settings.min_score,
                chunk_length=config.chunk_length,
                expected_embedder_fingerprint=str(opened.manifest["embedder"]["fingerprint"]),
                where=str(bank_path),
            )
        except UserError as error:
            raise UserError(f"retrieval: {error}") from None
    except BaseException:
        opened.store.close()
        raise
    prefix = torch.tensor(prefix_ids, dtype=torch.long, device=model.lm_head.weight.device)
    return Inference(model, tokenizer, retriever, opened, prefix, recipe, weights_path)
