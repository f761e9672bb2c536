"""The LightningModule: the composition root of a training stage (paper §3.5, §5).

`Memory3Module` trains one stage, chosen by `stage`:

- `warmup`: ordinary language-model pretraining — normal BOS, no memory;
- `continual`: continual training with explicit memory — every 64-token chunk has retrieved
  one reference; chunk *c* reads the memories of the references of chunks *c−4..c* (5
  memories, as at inference). The references are encoded **on the fly by the current
  weights** through the memory layers only, with gradients flowing through the selected keys
  and values (top-k indices chosen without gradient); a reference retrieved by several
  chunks of a batch is encoded once. `encode="no_grad"` encodes forward-only;
  `encode="store"` encodes nothing: the memories, read from a bank's store by the data
  pipeline (the paper's "frozen" option), arrive precomputed in the batch.

Optimiser: AdamW (weight decay 0.1, none on norms and embeddings), warmup-stable-decay or
cosine schedule, gradient clipping through the Trainer. Metrics (torchmetrics): loss,
perplexity and next-token accuracy, logged per stage and split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from m3.core import registry
from m3.core.errors import UserError
from m3.core.memories import Memories, SparseMemory, sliding_window_visibility
from m3.core.values import Bounds
from m3.memory.encoder import MemoryEncoder
from m3.memory.sparsifier import Sparsifier
from m3.model.config import Config
from m3.model.memory3 import Memory3
from m3.recipes.defaults import default_spec

Stage = Literal["warmup", "continual"]


def lr_multiplier(
    step: int,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    decay_fraction: float = 0.1,
    min_ratio: float = 0.0,
) -> float:
    """The learning-rate multiplier at an optimiser step.

    Args:
        step: Optimiser step (0-based).
        schedule: "wsd" (linear warmup, constant, then linear decay over the last
            `decay_fraction` of the steps), "cosine" (linear warmup, cosine decay) or
            "constant" (linear warmup, then constant).
        total_steps: Steps of the whole stage.
        warmup_steps: Steps of linear warmup.
        decay_fraction: Share of the steps in the final decay of "wsd".
        min_ratio: Multiplier reached at the end of a decay.

    Returns:
        The multiplier in `[min_ratio, 1]` (below `min_ratio` only during warmup).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(total_steps * decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * progress


class Memory3Module(L.LightningModule):
    """Trains a `Memory3` model in one of the paper's two stages.

    A recipe's `training:` section is this constructor's arguments (`m3.recipes.sections`):
    the options below are documented here only, and `m3 check` holds a recipe to this
    signature. `m3 fit` sets `model`, `stage`, `reference_prefix`, `encoder` and
    `sparsifier` from the rest of the recipe, and leaves `total_steps` to `trainer.max_steps`.

    Args:
        model: A preset name, a `Config`, or a mapping of config fields (with an optional
            `preset` key whose fields the others override).
        stage: "warmup" or "continual".
        lr: Peak learning rate (the paper: ≈ 8e-4 warmup, ≈ 5e-5 continual).
        weight_decay: AdamW weight decay of the weight matrices: the attention and MLP
            projections and an untied `lm_head`. The token embedding gets none, nor does
            the `lm_head` when `model.tie_embeddings` makes it the same tensor, nor any
            parameter of fewer than two dimensions (the norms' weights).
        betas: AdamW betas.
        schedule: "wsd" (warmup-stable-decay), "cosine" or "constant".
        warmup_steps: Linear warmup steps of the schedule.
        decay_fraction: Share of the steps in the final decay of "wsd".
        min_lr_ratio: Final learning rate as a fraction of `lr`.
        total_steps: Steps of the schedule; the Trainer's `max_steps` when None.
        reference_prefix: Token ids of `<s>Reference:` (from the tokenizer); needed by the
            continual stage.
        window: Chunks whose references a chunk reads (the paper: 5).
        encode: How the continual stage gets its references' memories. "grad": encoded on
            the fly by the current weights, gradients flowing through the selected keys and
            values (the paper's setting; ≈ 2× a warmup step); "no_grad": encoded on the fly,
            forward-only (≈ 1.3×); "store": not encoded at all, but read from a bank's store
            by the data pipeline (`training.memories`,
            `m3.training.datamodule.ContinualCollator(memories=...)`): the paper's "frozen"
            option, where the memories stay those of the weights that built the bank while
            training changes the weights. Memories precomputed in a batch skip encoding
            whatever the mode.
        encoder: Encodes references; m3's default encoder (`m3.recipes.defaults`,
            `MemoryEncoder()`) when None.
        sparsifier: Keeps the top tokens; m3's default (`TopKSparsifier(k=memory_tokens)`)
            when None.
        init_weights: Weights to start from: a Lightning `.ckpt` of this module, a `.pt`
            state dict of the model (a stage's `model.pt`, e.g. the warmup stage's for the
            continual stage), or a Hugging Face Llama-family folder
            (`m3.model.checkpoints`); None or "random": random weights. `m3 fit` requires a
            continual stage to name them, or to say "random" to train with memory from
            random weights (the paper's Figure 11 comparison).
    """

    def __init__(
        self,
        model: str | Config | dict[str, Any] = "tiny",
        *,
        stage: Stage = "warmup",
        lr: Annotated[float, Bounds(gt=0)] = 8e-4,
        weight_decay: Annotated[float, Bounds(ge=0)] = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        schedule: Literal["wsd", "cosine", "constant"] = "wsd",
        warmup_steps: Annotated[int, Bounds(ge=0)] = 100,
        decay_fraction: Annotated[float, Bounds(ge=0, le=1)] = 0.1,
        min_lr_ratio: Annotated[float, Bounds(ge=0, le=1)] = 0.0,
        total_steps: int | None = None,
        reference_prefix: Sequence[int] = (),
        window: Annotated[int, Bounds(ge=1)] = 5,
        encode: Literal["grad", "no_grad", "store"] = "grad",
        encoder: MemoryEncoder | None = None,
        sparsifier: Sparsifier | None = None,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        if stage not in ("warmup", "continual"):
            raise UserError(f"stage must be 'warmup' or 'continual', got {stage!r}")
        if encode not in ("grad", "no_grad", "store"):
            raise UserError(f"encode must be 'grad', 'no_grad' or 'store', got {encode!r}")
        if stage == "continual" and not reference_prefix:
            raise UserError("the continual stage needs reference_prefix (the tokenizer's ids)")
        self.config = config_from(model)
        self.save_hyperparameters(
            {"model": self.config.to_dict(), "stage": stage, "lr": lr, "weight_decay": weight_decay,
             "betas": list(betas), "schedule": schedule, "warmup_steps": warmup_steps,
             "decay_fraction": decay_fraction, "min_lr_ratio": min_lr_ratio,
             "total_steps": total_steps, "reference_prefix": list(reference_prefix),
             "window": window, "encode": encode}
        )  # fmt: skip
        self.stage = stage
        self.model = Memory3(self.config)
        self.encoder = encoder or registry.instantiate("encoder", default_spec("encoder"))
        self.sparsifier = sparsifier or registry.instantiate(
            "sparsifier", default_spec("sparsifier", self.config)
        )
        self.register_buffer(
            "prefix", torch.tensor(list(reference_prefix), dtype=torch.long), persistent=False
        )
        self.window = window
        self.encode = encode
        vocab = self.config.vocab_size
        self.train_accuracy = MulticlassAccuracy(vocab, average="micro")
        self.val_accuracy = MulticlassAccuracy(vocab, average="micro")
        self.train_perplexity, self.val_perplexity = Perplexity(), Perplexity()
        if init_weights and init_weights != "random":
            self.load_weights(init_weights)

    # ----------------------------------------------------------------------------- weights
    def load_weights(self, path: str | Path) -> None:
        """Load model weights from a checkpoint of this module, a state dict or a HF folder.

        Args:
            path: A Lightning `.ckpt` (its `model.*` weights are used), a `.pt` state dict, or
                a Hugging Face Llama-family folder.

        Raises:
            UserError: For a missing file, or weights of another shape (naming the tensor).
        """
        from m3.model.checkpoints import load_weights

        load_weights(self.model, path)

    # ----------------------------------------------------------------------------- steps
    def memories_for(self, batch: dict[str, Tensor]) -> Memories:
        """Build the batch's memory pool (encoding references on the fly unless precomputed).

        Args:
            batch: A continual batch: `pool` `(B, M)` indices into the batch's unique
                references (−1 = empty slot), `slots` `(B, C)` the pool slot each chunk
                retrieved (−1 = none), optionally `shared` `(B, M)` bool (slots every chunk
                of the row reads, the collator's distractors), and either
                `reference_tokens` `(U, R)` with
                `reference_lengths` `(U,)`, or the unique references' precomputed memories
                `memory_keys`, `memory_values`, `memory_valid`, `memory_positions` (the
                fields of a `SparseMemory`, as
                `m3.training.datamodule.ContinualCollator(memories=...)` reads them from a store).

        Returns:
            The pool with its sliding-window visibility (chunk c sees chunks c−window+1..c).
        """
        if "memory_keys" in batch:
            memory = SparseMemory(
                batch["memory_keys"],
                batch["memory_values"],
                batch["memory_valid"],
                batch["memory_positions"],
            )
        elif self.encode == "store":
            raise UserError(
                "encode='store' reads memories from a store: the batch has no memory_* "
                "tensors (collate it with "
                "m3.training.datamodule.ContinualCollator(memories=<bank folder>))"
            )
        else:
            with torch.set_grad_enabled(self.encode == "grad" and torch.is_grad_enabled()):
                dense = self.encoder(
                    self.model,
                    batch["reference_tokens"],
                    batch["reference_lengths"],
                    prefix=self.prefix,
                )
                memory = self.sparsifier(dense)
        dtype = self.model.lm_head.weight.dtype
        pool = batch["pool"]
        visible = sliding_window_visibility(batch["slots"], pool.shape[1], window=self.window)
        if "shared" in batch:  # distractors: slots every chunk of the row reads
            visible = visible | batch["shared"][:, None, :].to(visible.device)
        return Memories.from_references(memory.to(dtype=dtype), pool, visible)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits for a batch's inputs (`tokens[:, :-1]`), with memories in the continual stage.

        Args:
            batch: `tokens` `(B, T + 1)` and, for the continual stage, see `memories_for`.

        Returns:
            `(B, T, vocab_size)` logits.
        """
        inputs = batch["tokens"][:, :-1]
        if self.stage == "warmup":
            return self.model(inputs)
        return self.model(inputs, self.memories_for(batch), prefix=self.prefix)

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        logits = self(batch)
        targets = batch["tokens"][:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        accuracy = getattr(self, f"{split}_accuracy")
        perplexity = getattr(self, f"{split}_perplexity")
        accuracy.update(logits.detach().argmax(-1).flatten(), targets.flatten())
        perplexity.update(logits.detach().float(), targets)
        options = {"on_step": split == "train", "on_epoch": True, "batch_size": targets.shape[0]}
        self.log(f"{split}/loss", loss, prog_bar=True, **options)
        self.log(f"{split}/accuracy", accuracy, **options)
        self.log(f"{split}/perplexity", perplexity, **options)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step's loss.

        Args:
            batch: A collated batch: `"tokens"` `(B, T + 1)` (inputs and shifted targets),
                plus, in the continual stage, the pool layout (`"pool"`, `"slots"`) and the
                references to encode (`"reference_tokens"`, `"reference_lengths"`) or their
                memories read from a store (`"memory_*"`; see
                `m3.training.datamodule.ContinualCollator`).
            batch_idx: Index of the batch in the epoch.

        Returns:
            The scalar loss.
        """
        loss = self._step(batch, "train")
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Held-out loss, perplexity and accuracy.

        Args:
            batch: A collated batch, as in `training_step`.
            batch_idx: Index of the batch.

        Returns:
            The scalar loss.
        """
        return self._step(batch, "val")

    # ----------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW without decay on norms and embeddings, with the configured schedule."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.dim() < 2 or "embed_tokens" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = hp.total_steps or self.trainer.max_steps
        if not total or total < 0:
            raise UserError("set trainer.max_steps (or the module's total_steps) for the schedule")

        def multiplier(step: int) -> float:
            return lr_multiplier(
                step, schedule=hp.schedule, total_steps=total, warmup_steps=hp.warmup_steps,
                decay_fraction=hp.decay_fraction, min_ratio=hp.min_lr_ratio,
            )  # fmt: skip

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def config_from(model: str | Config | dict[str, Any]) -> Config:
    """Resolve a model description to a `Config`.

    Args:
        model: A preset name, a `Config`, or a mapping of fields with an optional `preset`.

    Returns:
        The config.
    """
    if isinstance(model, Config):
        return model
    if isinstance(model, str):
        return Config.from_name(model)
    fields = dict(model)
    preset = fields.pop("preset", None)
    return Config.from_name(preset, **fields) if preset else Config.from_dict(fields)
