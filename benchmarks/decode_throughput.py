"""Decoding throughput with and without explicit memory, and against RAG (paper §7.5).

The paper's setting, scaled down: the "small" preset (random weights: throughput does not
depend on what the weights say), bytes as tokens, batch 32, prompts of 128 tokens (with
`<s>`), 128 generated tokens per row (EOS ignored, so every row makes 128), greedy. Each row
retrieves 3 times: its two prompt chunks, then at token 192 (the first decoded chunk
inherits the last prompt chunk's memories). The memory bank is written by
`m3.bank.build.build_memory` into HDF5: the synthetic world's knowledge base (a few thousand
references of ≤ 128 bytes), the fitted `HashedNgramEmbedder` and an exact index; k = 5,
leakage threshold 2/3 against each row's context.

Scenarios (median of `--repeats` timed runs after one warm-up run; the scenarios take turns,
so that the machine's drift hits all of them alike):

- **none**: the same model reading no memories;
- **memory, RAM cache**: the retriever's LRU cache (4096 references) kept across runs;
- **memory, worst case**: cache off (`cache_size=0`) and reset, the page cache of the store
  files dropped before every run (`os.posix_fadvise(..., POSIX_FADV_DONTNEED)`), so every
  memory is read from HDF5;
- **RAG**: the 5 references of each prompt (retrieved once with the whole prompt) as text
  before the prompt (~5 × 128 more prompt tokens), no memories.

Throughput = generated tokens / wall time of the whole `generate` call (retrieval, prefill
and decoding). Phase times come from `Generation.times` (prefill, decode, sample, retrieve)
and `Retriever.phase_times` (embed, search, filter, cache, read, assemble; a part of
"retrieve").

    OMP_NUM_THREADS=1 python benchmarks/decode_throughput.py [--people 700] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from timing import interleaved_medians

from m3.bank.build import build_memory
from m3.data.sources import WorldSource
from m3.data.tokenizer import ByteTokenizer
from m3.inference.generate import Generation, generate
from m3.inference.loading import Inference, load_inference
from m3.model.memory3 import Memory3
from m3.recipes import load_recipe
from m3.retrieval.retriever import PHASES

ROOT = Path(__file__).resolve().parents[1]
BATCH, PROMPT, NEW = 32, 128, 128


def build_bank(folder: Path, people: int) -> Path:
    """Random small-preset weights and the bank they write of the world's knowledge base."""
    world = f"{{split: kb, n_people: {people}, n_places: {people // 3}, n_orgs: {people // 3}}}"
    recipe = load_recipe(
        [ROOT / "recipes/tiny/base.yaml", ROOT / "recipes/tiny/build-memory.yaml"],
        [
            "model={preset: small, block_size: 2048}",
            f"data.knowledge=[{{class_path: world, init_args: {world}}}]",
            f"output={folder / 'bank'}",
            f"training.init_weights={folder / 'model.pt'}",
            "trainer.enable_progress_bar=false",
        ],
    )
    torch.manual_seed(0)
    torch.save(Memory3(recipe.model.config()).state_dict(), folder / "model.pt")
    return build_memory(recipe, batch_size=64)


def prompts(people: int) -> list[str]:
    """32 windows of 127 bytes of the world's training text (128 tokens with `<s>`)."""
    text = " ".join(
        d.text for d in WorldSource("train", n_people=people, n_places=people // 3).documents()
    )
    data = text.encode()
    step = len(data) // BATCH
    windows = [data[i * step : i * step + PROMPT - 1] for i in range(BATCH)]
    return [w.decode("utf-8", errors="ignore").ljust(PROMPT - 1, ".") for w in windows]


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the store files' cached pages (the next reads hit the disk)."""
    for path in folder.glob("store-rank*.h5"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Scenario:
    """One way of generating the prompts' continuations, timed with the others in turns.

    With `cold`, every call starts with an empty RAM cache and the store files' pages
    dropped (both take a few ms, counted in the call's time).
    """

    def __init__(
        self, inference: Inference, texts: list[str], mode: str, *, cold: Path | None = None
    ) -> None:
        self.inference, self.texts, self.mode, self.cold = inference, texts, mode, cold
        self.phases: list[dict[str, float]] = []
        self.output: Generation | None = None

    def __call__(self) -> None:
        retriever = self.inference.retriever
        if self.cold is not None:
            retriever.reset_cache()
            drop_page_cache(self.cold)
        retriever.reset_stats()
        out = generate(
            self.inference, self.texts, max_new_tokens=NEW, mode=self.mode, ignore_eos=True
        )
        assert out.new_tokens == BATCH * NEW
        self.phases.append({**out.times, **retriever.phase_times()})
        self.output = out

    def median_phases(self) -> dict[str, float]:
        """Median time of each phase (ms) over the timed calls (the first one warmed up)."""
        timed = self.phases[1:]
        return {k: statistics.median(p[k] for p in timed) * 1e3 for k in timed[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--people", type=int, default=700, help="size of the world (≈ refs/4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = build_bank(Path(tmp), args.people)
        built = time.perf_counter() - start
        texts = prompts(args.people)
        assert all(len(ByteTokenizer().encode(t)) == PROMPT - 1 for t in texts)
        warm = load_inference(folder, device=args.device)
        # the same model object in every scenario: with a second copy of the weights, the
        # worst case decoded faster than the RAM-cache scenario doing the same work
        cold = replace(load_inference(folder, device=args.device, cache_size=0), model=warm.model)
        config, bank = warm.model.config, warm.bank
        print(
            f"preset small ({config.num_parameters / 1e6:.1f}M parameters, random weights), "
            f"memory shape {config.memory_shape} {bank.store.info.dtype}, "
            f"{len(bank.store)} references in HDF5 (built in {built:.0f} s), embedder "
            f"{type(bank.embedder).__name__} dim {bank.embedder.dim}, index "
            f"{type(bank.index).__name__}, k={warm.retriever.k}, threshold "
            f"{warm.retriever.threshold:.3f}, device {args.device}, "
            f"torch threads {torch.get_num_threads()}"
        )
        print(f"batch {BATCH}, {PROMPT} prompt + {NEW} generated tokens per row, greedy\n")
        scenarios = {
            "none": Scenario(warm, texts, "none"),
            "memory, RAM cache": Scenario(warm, texts, "memory"),
            "memory, worst case": Scenario(cold, texts, "memory", cold=folder),
            "RAG, 5 references": Scenario(warm, texts, "rag"),
        }
        # in turns, so that the machine's drift hits every scenario alike
        seconds = interleaved_medians(scenarios, args.repeats)  # type: ignore[arg-type]
        results = {
            name: (BATCH * NEW / seconds[name], scenario.median_phases(), scenario.output)
            for name, scenario in scenarios.items()
        }
        rag_prompt = statistics.mean(len(c) for c in results["RAG, 5 references"][2].contexts)
        columns = ["prefill", "decode", "sample", "retrieve", *PHASES]
        print(f"{'scenario':<20} {'tokens/s':>9}  " + " ".join(f"{c:>8}" for c in columns))
        for name, (rate, phases, _) in results.items():
            cells = " ".join(f"{phases[c]:8.0f}" for c in columns)
            print(f"{name:<20} {rate:9.0f}  {cells}")
        print("(phase times in ms per run of 32 rows; embed..assemble are parts of retrieve)")
        print(f"RAG prompts: {rag_prompt:.0f} tokens on average (with <s>)\n")
        none = results["none"][0]
        rag = results["RAG, 5 references"][0]
        for name in ("memory, RAM cache", "memory, worst case"):
            rate = results[name][0]
            print(
                f"{name}: with/without memory {rate / none:.2f} (paper 0.65), "
                f"memory/RAG {rate / rag:.2f}x"
            )
        hits = warm.retriever.cache_stats()
        print(f"RAM cache: {hits.hits} hits, {hits.misses} misses ({hits.hit_rate:.0%})")
        warm.close()
        cold.close()


if __name__ == "__main__":
    main()
