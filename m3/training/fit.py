"""`m3 fit`: train one stage (warmup or continual) from a recipe, with Lightning's Trainer.

Everything is checked before training starts: the recipe, the tokenizer against the model's
vocabulary, the warmup checkpoint of a continual stage and its knowledge base, and, with
`training.encode: store`, the bank it reads memories from (`training.memories`). The run folder
(`output`) then holds:

- `checkpoints/` (Lightning checkpoints; an interrupted run resumes from `last.ckpt`),
- `logs/metrics.csv` and `curves.png` (training and held-out loss per step),
- `model.pt` (the model's weights, which the next stage's `training.init_weights` names),
- `recipe.yaml` and `done.json` (written last: the stage is complete).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from m3.core.errors import UserError
from m3.core.runs import RunFolder
from m3.recipes import Recipe, build, build_tokenizer


def _components(recipe: Recipe, kind_section: str, default: Any) -> Any:
    return build(recipe, kind_section) if getattr(recipe, kind_section) is not None else default


def fit(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """Train the stage a recipe describes.

    Args:
        recipe: A checked recipe with `stage: warmup` or `stage: continual`.
        overwrite: Replace a run folder that another recipe wrote.

    Returns:
        The run folder.

    Raises:
        UserError: For a recipe that cannot train (missing data, tokenizer, checkpoint or
            knowledge base; a tokenizer larger than the model's vocabulary).
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
    if init == "random":
        init = None
    elif init is not None and not Path(init).exists():
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

    from m3.core import registry
    from m3.core.plots import plot_training_curves
    from m3.data.chunking import FixedChunker
    from m3.training.datamodule import TextDataModule
    from m3.training.module import Memory3Module

    config = recipe.model.config()
    tokenizer = build_tokenizer(recipe)
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        print(f"m3 fit: {run.path} is complete for this recipe; nothing to do")
        return run.path
    data_spec = recipe.data

    def sources(specs: list | None) -> list | None:
        return None if specs is None else [registry.instantiate("source", s) for s in specs]

    # the bank builder cuts the knowledge base the same way: reference ids must agree
    chunker = _components(recipe, "chunker", FixedChunker(config.reference_length))
    data = TextDataModule(
        tokenizer,
        sources(data_spec.train),
        val=sources(data_spec.val),
        val_fraction=data_spec.val_fraction,
        seq_length=data_spec.seq_length,
        batch_size=data_spec.batch_size,
        num_workers=data_spec.num_workers,
        seed=recipe.seed,
        knowledge=sources(data_spec.knowledge) if continual else None,
        chunker=chunker,
        embedder=_components(recipe, "embedder", None),
        chunk_length=config.chunk_length,
        threshold=data_spec.threshold,
        candidates=data_spec.candidates,
        pairing_file=data_spec.pairing_file or run.path / "pairing.pt",
        memories=memories,
    )
    training = recipe.training
    L.seed_everything(recipe.seed, workers=True)
    module = Memory3Module(
        config,
        stage=recipe.stage,
        lr=training.lr,
        weight_decay=training.weight_decay,
        betas=training.betas,
        schedule=training.schedule,
        warmup_steps=training.warmup_steps,
        decay_fraction=training.decay_fraction,
        min_lr_ratio=training.min_lr_ratio,
        reference_prefix=tokenizer.reference_prefix(),
        window=training.window,
        encode=training.encode,
        encoder=_components(recipe, "encoder", None),
        sparsifier=_components(recipe, "sparsifier", None),
        init_weights=init,
    )
    if memories is not None:  # the bank was written by the initial weights: check it now
        data.check_memories(module.model)
    run.claim(overwrite=overwrite)  # everything above is checked: now the folder is ours
    options = recipe.trainer.to_kwargs()
    every = max(1, options["max_steps"] // 10)
    checkpoints = ModelCheckpoint(
        run.path / "checkpoints", save_last=True, every_n_train_steps=every, save_top_k=1
    )
    trainer = L.Trainer(
        **options,
        default_root_dir=run.path,
        logger=CSVLogger(run.path, name="", version="logs"),
        callbacks=[checkpoints],
    )
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
