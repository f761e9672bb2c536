"""`m3 fit`: train one stage (warmup or continual) from a recipe, with Lightning's Trainer.

Everything is checked before training starts and before the run folder is claimed (so that a
refused run leaves no folder that the corrected recipe would need `--overwrite` for): the
recipe, the tokenizer against the model's vocabulary, the text (readable, distinct document
ids, documents within their size limit, enough for one batch of the training split and one
sequence of `data.val`: `TextDataModule.read_data`), the warmup checkpoint of a continual
stage and its knowledge base, and, with `training.encode: store`, the bank it reads memories
from (`training.memories`). The run folder (`output`) then holds:

- `checkpoints/` (Lightning checkpoints; an interrupted run resumes from `last.ckpt`),
- `logs/metrics.csv` and `curves.png` (training and held-out loss per step),
- `model.pt` (the model's weights, which the next stage's `training.init_weights` names),
- `recipe.yaml` and `done.json` (written last: the stage is complete).

The recipe's sections are the constructors' arguments (`m3.recipes.sections`): `training:`
builds the `Memory3Module` (`training_module`), `data:` the `TextDataModule` (`data_module`)
and `trainer:` the Trainer, each completed by the parts the rest of the recipe names
(`m3.recipes.build`: the recipe's, or m3's defaults, the same as the bank builder's).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3.core import registry
from m3.core.errors import UserError
from m3.core.runs import RunFolder
from m3.recipes import Recipe, build, build_tokenizer, build_trainer

if TYPE_CHECKING:
    from m3.training.datamodule import TextDataModule
    from m3.training.module import Memory3Module


def data_module(
    recipe: Recipe, tokenizer: Any, *, pairing_file: str | Path | None = None
) -> TextDataModule:
    """The data module of a training recipe: its `data:` section, completed.

    Args:
        recipe: A checked recipe with a `data` section (a continual stage reads
            `data.knowledge`; other stages do not).
        tokenizer: The recipe's tokenizer (`m3.recipes.build_tokenizer`).
        pairing_file: Where the pairing is cached when `data.pairing_file` is unset.

    Returns:
        `TextDataModule(**recipe.data, ...)` with the sources built, and the recipe's seed,
        chunker, embedder, model chunk length and `training.memories`.
    """
    from m3.training.datamodule import TextDataModule

    assert recipe.data is not None
    continual = recipe.stage == "continual"
    arguments = dict(recipe.data)
    for key in recipe.data.components():  # train, val, knowledge: lists of sources
        specs = arguments[key] if continual or key != "knowledge" else None
        arguments[key] = (
            None if specs is None else [registry.instantiate("source", s) for s in specs]
        )
    arguments["pairing_file"] = arguments["pairing_file"] or pairing_file
    return TextDataModule(
        **arguments,
        tokenizer=tokenizer,
        seed=recipe.seed,
        # the bank builder cuts the knowledge base the same way: reference ids must agree
        chunker=build(recipe, "chunker"),
        embedder=build(recipe, "embedder"),
        chunk_length=recipe.model.config().chunk_length,
        memories=recipe.training.memories,
    )


def training_module(recipe: Recipe, tokenizer: Any) -> Memory3Module:
    """The LightningModule of a training recipe: its `training:` section, completed.

    Args:
        recipe: A checked recipe with `stage: warmup` or `stage: continual`.
        tokenizer: The recipe's tokenizer, whose reference prefix the continual stage reads.

    Returns:
        `Memory3Module(**recipe.training.arguments(), ...)` with the recipe's model, stage,
        encoder and sparsifier; `training.init_weights` loaded (or "random").
    """
    from m3.training.module import Memory3Module

    return Memory3Module(
        **recipe.training.arguments(),
        model=recipe.model.config(),
        stage=recipe.stage,
        reference_prefix=tokenizer.reference_prefix(),
        encoder=build(recipe, "encoder"),
        sparsifier=build(recipe, "sparsifier"),
    )


def fit(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """Train the stage a recipe describes.

    Args:
        recipe: A checked recipe with `stage: warmup` or `stage: continual`.
        overwrite: Replace a run folder that another recipe wrote.

    Returns:
        The run folder.

    Raises:
        UserError: For a recipe that cannot train (missing data, tokenizer, checkpoint or
            knowledge base; a tokenizer larger than the model's vocabulary; unreadable text,
            duplicate document ids, too long documents, too little text for one batch), all
            before the run folder is claimed.
    """
    if recipe.stage not in ("warmup", "continual"):
        raise UserError(
            f"stage: m3 fit trains 'warmup' or 'continual' stages, got {recipe.stage!r}"
        )
    if recipe.data is None or not recipe.data.train:
        raise UserError("data.train: a training recipe needs the sources of its training text")
    if recipe.tokenizer is None:
        raise UserError("tokenizer: a training recipe needs a tokenizer")
    continual = recipe.stage == "continual"
    init = recipe.training.init_weights
    if continual and init is None:
        raise UserError(
            "training.init_weights: the continual stage starts from the warmup stage's weights "
            "(e.g. runs/<name>/warmup/model.pt) or a pretrained folder; 'random' trains with "
            "memory from random weights"
        )
    if init is not None and init != "random" and not Path(init).exists():
        raise UserError(
            f"training.init_weights: {init} does not exist (run the warmup stage first?)"
        )
    if continual and not recipe.data.knowledge:
        raise UserError("data.knowledge: the continual stage needs the knowledge base's sources")
    memories = recipe.training.memories
    if recipe.training.encode == "store" and continual and memories is None:
        raise UserError(
            "training.memories: training.encode: store reads the references' memories from a "
            "bank: name the folder m3 build-memory wrote (e.g. runs/<name>/bank)"
        )
    if memories is not None and (recipe.training.encode != "store" or not continual):
        raise UserError(
            f"training.memories: only a continual stage with training.encode: store reads "
            f"memories from a bank (this is a {recipe.stage} stage with encode: "
            f"{recipe.training.encode}): set training.encode: store or drop training.memories"
        )

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from m3.core.plots import plot_training_curves

    config = recipe.model.config()
    tokenizer = build_tokenizer(recipe)
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        print(f"m3 fit: {run.path} is complete for this recipe; nothing to do")
        return run.path
    data = data_module(recipe, tokenizer, pairing_file=run.path / "pairing.pt")
    data.read_data()  # the user's text: read, checked (enough for one batch), split
    L.seed_everything(recipe.seed, workers=True)
    module = training_module(recipe, tokenizer)
    if memories is not None:  # the bank was written by the initial weights: check it now
        data.check_memories(module.model)
    options = recipe.trainer.to_kwargs()
    every = max(1, options["max_steps"] // 10)
    checkpoints = ModelCheckpoint(
        run.path / "checkpoints", save_last=True, every_n_train_steps=every, save_top_k=1
    )
    trainer = build_trainer(  # before the claim: Lightning refuses some options only here
        options,
        default_root_dir=run.path,
        logger=CSVLogger(run.path, name="", version="logs"),
        callbacks=[checkpoints],
    )
    run.claim(overwrite=overwrite)  # everything above is checked: now the folder is ours
    last = run.path / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"m3 fit: resuming from {last}")
    with warnings.catch_warnings():
        # m3's data module restores the data position itself (see TextDataModule.state_dict)
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=data, ckpt_path=last if last.is_file() else None)

    import torch

    torch.save(module.model.state_dict(), run.path / "model.pt")
    (run.path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    metrics = run.path / "logs" / "metrics.csv"
    if metrics.is_file():
        plot_training_curves(metrics, run.path / "curves.png", title=f"{recipe.stage} stage")
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    run.finish({"stage": recipe.stage, "steps": trainer.global_step, "metrics": final})
    print(f"m3 fit: {recipe.stage} stage done in {run.path} ({trainer.global_step} steps)")
    return run.path
