"""The paper's Figure 11 at small scale: when should memory join training?

Three runs on the synthetic world, equal total steps, the same data order:

- **warmup → continual with memory** (the paper's recipe);
- **warmup → more warmup** (no memory at all);
- **memory from step 0** (continual training from random weights).

The script prints the held-out loss on knowledge-heavy text of each run — read with its
memories where it has them — and plots the curves next to the table (`figure11.png`).

    OMP_NUM_THREADS=1 python benchmarks/figure11.py [--warmup-steps 200] [--continual-steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from m3.chunking import FixedChunker
from m3.data import TextDataModule
from m3.embedders import HashedNgramEmbedder
from m3.module import Memory3Module
from m3.plots import _pyplot
from m3.sources import StdlibSource, WorldSource
from m3.tokenizer import HFTokenizer

SIZES = {"n_people": 1200, "n_places": 400, "n_orgs": 400}


def model_config(vocab: int) -> dict:
    return dict(
        preset="tiny", vocab_size=vocab, n_layer=4, n_embd=128, n_head=4, n_kv_head=2,
        head_dim=32, mlp_hidden=384, block_size=256, memory_layers=[1, 2],
    )  # fmt: skip


class Curve(L.Callback):
    """Records the held-out loss at every validation."""

    def __init__(self, offset: int) -> None:
        self.offset, self.points = offset, []

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if "val/loss" in trainer.callback_metrics and not trainer.sanity_checking:
            self.points.append(
                (self.offset + trainer.global_step, float(trainer.callback_metrics["val/loss"]))
            )


def train(
    module: Memory3Module, data: TextDataModule, steps: int, curve: Curve, root: Path
) -> None:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=root,
        val_check_interval=max(1, steps // 4), check_val_every_n_epoch=None,
        limit_val_batches=4, callbacks=[curve], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--continual-steps", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp())
    start = time.perf_counter()

    # warmup on another world and stdlib text; continual on this world, whose facts are new
    warm_text = [
        WorldSource("train", seed=1, **SIZES),
        WorldSource("kb", seed=1, **SIZES),
        StdlibSource(max_chars=300_000),
    ]
    train_text = [WorldSource("train", seed=0, **SIZES)]
    knowledge = [WorldSource("kb", seed=0, **SIZES)]
    texts = [d.text for s in (*warm_text, *train_text, *knowledge) for d in s.documents()]
    tokenizer = HFTokenizer.train(texts, vocab_size=2048)
    config = model_config(tokenizer.vocab_size)
    prefix = tokenizer.reference_prefix()

    def data(sources: list, *, memory: bool) -> TextDataModule:
        return TextDataModule(
            tokenizer, sources, seq_length=256, batch_size=8, val_fraction=0.05, seed=0,
            knowledge=knowledge if memory else None, chunker=FixedChunker(128),
            embedder=HashedNgramEmbedder(dim=4096, ngrams=(1,)),
        )  # fmt: skip

    runs = {}
    L.seed_everything(0)
    warm = Memory3Module(config, lr=3e-3, warmup_steps=20)
    warm_curve = Curve(0)
    train(warm, data(warm_text, memory=False), args.warmup_steps, warm_curve, root)
    torch.save(warm.model.state_dict(), root / "warm.pt")
    for name, stage, init in (
        ("warmup → continual with memory", "continual", root / "warm.pt"),
        ("warmup → more warmup (no memory)", "warmup", root / "warm.pt"),
        ("memory from step 0", "continual", None),
    ):
        L.seed_everything(0)
        module = Memory3Module(
            config, stage=stage, lr=2e-3, warmup_steps=20, reference_prefix=prefix,
            init_weights=str(init) if init else None,
        )  # fmt: skip
        offset = args.warmup_steps if init else 0
        steps = args.continual_steps if init else args.warmup_steps + args.continual_steps
        curve = Curve(offset)
        # every run is scored on the same knowledge-heavy held-out text, with memory when it has it
        train(
            module,
            data(train_text, memory=True)
            if stage == "continual"
            else data(train_text, memory=False),
            steps,
            curve,
            root,
        )
        runs[name] = curve.points

    print(f"tiny-like model, {args.warmup_steps} warmup + {args.continual_steps} continual steps, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    print(f"{'run':<36}{'final held-out loss':>22}")
    for name, points in runs.items():
        print(f"{name:<36}{points[-1][1]:>22.3f}")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.plot(*zip(*warm_curve.points, strict=True), "k--", label="warmup (other text)")
    for name, points in runs.items():
        axis.plot(*zip(*points, strict=True), "o-", label=name, markersize=3)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("held-out loss on knowledge-heavy text")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "figure11.png", dpi=120)
    print(f"plot: {out / 'figure11.png'}")


if __name__ == "__main__":
    main()
