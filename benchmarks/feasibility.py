"""Does a small model learn to read its memories? Cloze accuracy with, without and shuffled memory.

The feasibility check of the two-stage recipe (SPEC §5) on the synthetic world:

1. warmup (no memory) on *another* world's text, its knowledge base and stdlib English, so
   that this world's facts are new to the model;
2. continual training with explicit memory on this world's training text, each 64-token
   chunk paired with one reference of its knowledge base (leakage filter 0.9);
3. multiple-choice cloze on held-out entities, whose answers live only in the knowledge
   base: each prompt retrieves 5 references (hashed unigrams, leakage filter 2/3), and the
   option with the highest log-likelihood wins. Reported with memory, without memory (the
   same model, empty memories), and with memories shuffled across questions (a negative
   control that should fall back to the no-memory level).

    OMP_NUM_THREADS=1 python benchmarks/feasibility.py [--warmup-steps 1200] [--continual-steps 800]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from m3.backends.exact_index import ExactIndex
from m3.chunking import FixedChunker
from m3.data import TextDataModule
from m3.embedders import HashedNgramEmbedder
from m3.encoding import encode_references
from m3.memory import Memories
from m3.module import Memory3Module
from m3.overlap import leak_mask
from m3.sources import StdlibSource, WorldSource
from m3.tokenizer import HFTokenizer
from m3.world import World


def trainer(steps: int, root: Path) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=root,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip


def cloze_accuracy(module, world, tokenizer, references, *, memory: str) -> float:
    """Share of questions answered right; memory is "on", "off" or "shuffled"."""
    model = module.model.eval()
    prefix = torch.tensor(tokenizer.reference_prefix())
    embedder = HashedNgramEmbedder(dim=4096, ngrams=(1,))
    texts = [tokenizer.decode(list(r.ids)) for r in references]
    embedder.fit(texts)
    index = ExactIndex(embedder.dim)
    index.add(embedder.embed(texts), torch.arange(len(texts)))
    questions = world.cloze_questions()
    hits = index.search(embedder.embed([q.prompt for q in questions]), 10).ids.tolist()
    chosen = []
    for question, row in zip(questions, hits, strict=True):
        ids = [tokenizer.bos_id, *tokenizer.encode(question.prompt)]
        leaks = leak_mask(ids, [references[i].ids for i in row], 2 / 3).tolist()
        keep = [i for i, leak in zip(row, leaks, strict=True) if not leak][:5]
        chosen.append(keep + [-1] * (5 - len(keep)))
    chosen = torch.tensor(chosen)
    if memory == "shuffled":
        chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(1))]
    distinct = sorted({i for row in chosen.tolist() for i in row if i >= 0})
    slot = {ref: j for j, ref in enumerate(distinct)}
    with torch.no_grad():
        bank = encode_references(model, [references[i].ids for i in distinct], prefix=prefix)
        correct = 0
        for q, question in enumerate(questions):
            context = [tokenizer.bos_id, *tokenizer.encode(question.prompt)]
            options = [context + tokenizer.encode(o) for o in question.options]
            width = max(len(o) for o in options)
            idx = torch.zeros(len(options), width, dtype=torch.long)
            for i, option in enumerate(options):
                idx[i, : len(option)] = torch.tensor(option)
            chunks = math.ceil(width / model.config.chunk_length)
            if memory == "off":
                memories = Memories.empty(
                    len(options), chunks, memory_shape=model.config.memory_shape
                )
            else:
                pool = torch.tensor([[slot.get(i, -1) for i in chosen[q].tolist()]] * len(options))
                memories = Memories.from_references(bank, pool)
                visible = torch.ones(len(options), chunks, pool.shape[1], dtype=torch.bool)
                memories = Memories(memories.keys, memories.values, memories.valid, visible)
            logp = torch.log_softmax(model(idx, memories, prefix=prefix).float(), -1)
            scores = [
                sum(float(logp[i, t - 1, option[t]]) for t in range(len(context), len(option)))
                for i, option in enumerate(options)
            ]
            correct += int(max(range(len(scores)), key=scores.__getitem__) == question.answer)
    return correct / len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-steps", type=int, default=1200)
    parser.add_argument("--continual-steps", type=int, default=800)
    parser.add_argument("--memory-layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--memory-tokens", type=int, default=8, help="tokens kept per head")
    args = parser.parse_args()
    start, root = time.perf_counter(), Path(tempfile.mkdtemp())
    world = World.generate(0)
    warm_text = [
        WorldSource("train", seed=1),
        WorldSource("kb", seed=1),
        StdlibSource(max_chars=400_000),
    ]
    train_text, knowledge = [WorldSource("train", seed=0)], [WorldSource("kb", seed=0)]
    texts = [d.text for s in (*warm_text, *train_text, *knowledge) for d in s.documents()]
    tokenizer = HFTokenizer.train(texts, vocab_size=2048)
    config = dict(
        preset="tiny", vocab_size=tokenizer.vocab_size, n_layer=4, n_embd=128, n_head=4,
        n_kv_head=2, head_dim=32, mlp_hidden=384, block_size=256, memory_layers=args.memory_layers,
        memory_tokens=args.memory_tokens,
    )  # fmt: skip
    L.seed_everything(0)
    warm = Memory3Module(config, lr=3e-3, warmup_steps=30)
    data = TextDataModule(tokenizer, warm_text, seq_length=256, batch_size=8, val_fraction=0.02)
    trainer(args.warmup_steps, root).fit(warm, datamodule=data)
    torch.save(warm.model.state_dict(), root / "warm.pt")
    continual = Memory3Module(
        config, stage="continual", lr=args.lr, warmup_steps=20,
        reference_prefix=tokenizer.reference_prefix(), init_weights=str(root / "warm.pt"),
    )  # fmt: skip
    data = TextDataModule(
        tokenizer, train_text, seq_length=256, batch_size=8, val_fraction=0.02,
        knowledge=knowledge, chunker=FixedChunker(128),
        embedder=HashedNgramEmbedder(dim=4096, ngrams=(1,)),
    )  # fmt: skip
    trainer(args.continual_steps, root).fit(continual, datamodule=data)
    references = data.references
    chance = world.cloze_questions()[0].chance
    print(f"model: 4 layers, d=128, memory layers {args.memory_layers}, 2048-id BPE; "
          f"{args.warmup_steps} warmup + {args.continual_steps} continual steps of 8 x 256 tokens; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    print(f"{'cloze accuracy (chance ' + format(chance, '.0%') + ')':<40}{'':>8}")
    baseline = cloze_accuracy(warm, world, tokenizer, references, memory="off")
    print(f"{'warmup model, no memory':<40}{baseline:>8.3f}")
    for memory in ("off", "on", "shuffled"):
        accuracy = cloze_accuracy(continual, world, tokenizer, references, memory=memory)
        print(f"{'continual model, memory ' + memory:<40}{accuracy:>8.3f}")


if __name__ == "__main__":
    main()
