"""Retriever latency per phase: a 32-chunk prompt and the one-chunk decoding step.

A knowledge base of `--count` references (~100-byte texts of random words, bytes as tokens)
with random memories of the "small" preset's shape `(3, 2, 2, 8, 32)` in an `HDF5Store` on
local disk (warm page cache: the file was just written) and the references' token ids in a
reference table (`m3.bank.table`), opened as `m3.bank.open.open_bank` opens a bank: a
`ShardedStore` over the shard, given the table. An `ExactIndex` of `HashedNgramEmbedder`
vectors (dim 2048), k = 5, over-fetch 3, leakage threshold 2/3. Each query chunk holds rare
words of a few references, so neighbouring chunks share some of their references, as
adjacent chunks of a document do.

Scenarios (each the median of `--rounds` runs, times in ms):

- prompt, sequential: the 32 chunks retrieved one `retrieve_next` call at a time;
- prompt, batched: one `retrieve_context` call, all 32 chunks in one group (no reader thread);
- prompt, batched + overlapped: one call, groups of 8 chunks, store reads of a group in the
  reader thread while the next group is embedded, searched and filtered;
- decode step: one `retrieve_next` per 64-token boundary along the prompt (the critical
  path at decoding time), per step.

Each runs with the cache off (`cache_size=0`) and on (4096 references; emptied before each
prompt round, so hits come only from repeats within the round). Phase columns sum the
calling thread's time (embed, search, filter, cache, assemble) and the store reads, which in
the overlapped scenario run in the reader thread, so they can add up to more than the total.

A second table times the leakage filter side by side with its previous implementation
(`m3.retrieval.overlap._baseline_leak_mask`, one bit-parallel LCS per window, reading the
candidates' token ids through h5py), cache off, the runs taking turns: the decoding step at
the last boundary (a 2048-token context) and the batched 32-chunk prompt, each with the
filter off, the previous filter, the current filter reading token ids through h5py (a bank
built before the reference table) and the current filter reading them from the table, and
the ratio previous ÷ current (median of `--baseline-rounds`), then the same calls in the CPU
time of this process (`time.process_time`), which other jobs on a shared machine do not
inflate as they do wall time.

    OMP_NUM_THREADS=1 python benchmarks/retrieval_latency.py [--count 4000] [--rounds 7]
        [--threshold 0.667 | none] [--baseline-rounds 3]

With bytes as tokens (a 26-letter alphabet, spaces) the count bounds of the overlap prune
little; `--threshold none` shows the rest of the path.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import m3.retrieval.candidates as candidates
from m3.backends.base import StoreInfo
from m3.backends.exact_index import ExactIndex
from m3.backends.hdf5_store import HDF5Store
from m3.backends.sharded import ShardedStore
from m3.bank.table import ReferenceTable, write_table
from m3.core.memories import SparseMemory
from m3.data.chunking import FixedChunker, Reference
from m3.data.documents import Document
from m3.data.tokenizer import ByteTokenizer
from m3.model.config import Config
from m3.retrieval.embedders import HashedNgramEmbedder
from m3.retrieval.overlap import _baseline_leak_mask, leak_mask
from m3.retrieval.retriever import PHASES, Retriever

CHUNKS = 32


def build_bank(
    directory: Path, count: int
) -> tuple[HDF5Store, ReferenceTable, list[str], list[str]]:
    """Write `count` random references; return the store, their table, texts and rare words."""
    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))

    rare = [word() for _ in range(count)]
    texts = [" ".join([rare[i], *(word() for _ in range(12))])[:128] for i in range(count)]
    tokenizer = ByteTokenizer()
    shape = Config.from_name("small").memory_shape
    layers, _, heads, tokens, dim = shape
    generator = torch.Generator().manual_seed(0)
    memory = SparseMemory(
        keys=torch.randn(count, layers, heads, tokens, dim, generator=generator),
        values=torch.randn(count, layers, heads, tokens, dim, generator=generator),
        valid=torch.ones(count, tokens, dtype=torch.bool),
        positions=torch.arange(tokens).expand(count, layers, heads, tokens).clone(),
    )
    info = StoreInfo(memory_shape=shape, dtype="float32")
    references = [
        Reference(i, 0, len(text), tuple(tokenizer.encode(text))) for i, text in enumerate(texts)
    ]
    with HDF5Store(directory / "bank.h5", info=info, mode="w") as store:
        store.write(torch.arange(count), memory, references)
        store.mark_complete()
    documents = [Document(i, text) for i, text in enumerate(texts)]
    table = write_table(directory / "references", documents, tokenizer, chunker=FixedChunker(128))
    assert list(table) == references, "the table holds the store's references"
    return HDF5Store(directory / "bank.h5"), table, texts, rare


def prompt_ids(rare: list[str], seed: int) -> list[int]:
    """A 32-chunk prompt: each 64-byte chunk names rare words of references near its own."""
    rng = random.Random(seed)
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id]
    topic = rng.randrange(len(rare))
    while len(ids) < CHUNKS * 64:
        topic = (topic + rng.choice([0, 0, 1, 2])) % len(rare)
        ids += tokenizer.encode(f" {rare[topic]} and {rare[(topic + 1) % len(rare)]}")
    return ids[: CHUNKS * 64]


def measure(run: Callable[[], int], retriever: Retriever, rounds: int) -> dict[str, float]:
    """Median wall time and phase times (ms) of `run`, per unit it returns."""
    totals: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    rates = []
    for _ in range(rounds):
        retriever.reset_cache()
        retriever.reset_stats()
        start = time.perf_counter()
        units = run()
        totals.append((time.perf_counter() - start) * 1e3 / units)
        for phase, seconds in retriever.phase_times().items():
            phases[phase].append(seconds * 1e3 / units)
        rates.append(retriever.cache_stats().hit_rate)
    out = {"total": statistics.median(totals)}
    out.update({p: statistics.median(v) for p, v in phases.items()})
    out["hit rate"] = statistics.median(rates)
    return out


def compare_filters(
    make: Callable[[float | None, bool], Retriever],
    prompt: list[int],
    threshold: float,
    rounds: int,
) -> None:
    """Print the filter-off, previous-filter and current-filter times of two scenarios.

    The filter phase holds the overlap computation (timed apart: the time spent in the
    mask function) and the reads of the candidates' token ids (through h5py, or from the
    reference table). `make(threshold, table)` gives a retriever.
    """
    scenarios = {
        "decode step, 2048-token context": lambda r: r.retrieve_next([prompt]),
        "prompt, batched (32 chunks)": lambda r: r.retrieve_context([prompt]),
    }
    variants = {  # threshold, mask, token ids from the table
        "off": (None, leak_mask, True),
        "previous": (threshold, _baseline_leak_mask, False),
        "current, h5py": (threshold, leak_mask, False),
        "current, table": (threshold, leak_mask, True),
    }
    retrievers = {name: make(t, table) for name, (t, _, table) in variants.items()}
    times: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(rounds):
        for scenario, run in scenarios.items():
            for name, (_, mask, _) in variants.items():
                retriever = retrievers[name]
                retriever.reset_cache()
                retriever.reset_stats()
                spent = [0.0]

                def timed_mask(
                    *args: Any, mask: Callable[..., Any] = mask, spent: list[float] = spent
                ) -> Any:
                    clock = time.perf_counter()
                    try:
                        return mask(*args)
                    finally:
                        spent[0] += time.perf_counter() - clock

                candidates.leak_mask = timed_mask  # type: ignore[assignment]
                try:
                    start, cpu = time.perf_counter(), time.process_time()
                    run(retriever)
                    elapsed = time.perf_counter() - start
                    cpu = time.process_time() - cpu
                finally:
                    candidates.leak_mask = leak_mask  # type: ignore[assignment]
                phase = retriever.phase_times()["filter"]
                for what, seconds in (
                    ("total", elapsed), ("filter", phase), ("lcs", spent[0]), ("cpu", cpu)
                ):  # fmt: skip
                    times.setdefault((scenario, name, what), []).append(seconds * 1e3)
    print(
        f"\nleakage filter, previous vs current (threshold {threshold:.3f}, cache off, median "
        f"of {rounds} rounds in turns), ms: total / filter phase / of which overlap; "
        "token ids read through h5py or from the reference table"
    )
    shown = ("previous", "current, h5py", "current, table")
    print(
        f"| {'scenario':<32} | {'off':>6} | " + " | ".join(f"{n:>26}" for n in shown) + " | ratio |"
    )
    print("|" + "-" * 34 + "|--------|" + "|".join("-" * 28 for _ in shown) + "|-------|")
    for scenario in scenarios:
        m = {
            (n, w): statistics.median(times[(scenario, n, w)])
            for n in variants
            for w in ("total", "filter", "lcs")
        }
        cells = [
            f"{m[(n, 'total')]:>8.1f} / {m[(n, 'filter')]:>7.1f} / {m[(n, 'lcs')]:>7.1f}"
            for n in shown
        ]
        ratio = m[("previous", "total")] / m[("current, table", "total")]
        print(
            f"| {scenario:<32} | {m[('off', 'total')]:>6.1f} | "
            + " | ".join(f"{c:>26}" for c in cells)
            + f" | {ratio:>5.0f} |"
        )
    # CPU time of the calling process: what other processes on a shared machine leave alone
    print("\nthe same calls in CPU time of this process, ms (median)")
    print(f"| {'scenario':<32} | " + " | ".join(f"{n:>14}" for n in variants) + " |")
    print("|" + "-" * 34 + "|" + "|".join("-" * 16 for _ in variants) + "|")
    for scenario in scenarios:
        cpu = [statistics.median(times[(scenario, n, "cpu")]) for n in variants]
        print(f"| {scenario:<32} | " + " | ".join(f"{c:>14.1f}" for c in cpu) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--threshold", default="0.6666666666666666", help="leakage threshold, or 'none' (off)"
    )
    parser.add_argument(
        "--baseline-rounds", type=int, default=3, help="rounds of the filter comparison (0: skip)"
    )
    args = parser.parse_args()
    threshold = None if args.threshold.lower() == "none" else float(args.threshold)
    with tempfile.TemporaryDirectory() as tmp:
        shard, table, texts, rare = build_bank(Path(tmp), args.count)
        bank_store = ShardedStore([shard], table=table)  # as open_bank opens a bank
        embedder = HashedNgramEmbedder(dim=2048)
        embedder.fit(texts)
        index = ExactIndex(embedder.dim, metric="cosine")
        index.add(embedder.embed(texts), torch.arange(len(texts)))
        prompt = prompt_ids(rare, seed=1)
        boundaries = [prompt[: (c + 1) * 64] for c in range(CHUNKS)]

        def make(
            cache_size: int,
            group_size: int,
            leak_threshold: float | None = threshold,
            from_table: bool = True,
        ) -> Retriever:
            return Retriever(
                embedder=embedder,
                index=index,
                store=bank_store if from_table else shard,
                tokenizer=ByteTokenizer(),
                cache_size=cache_size,
                group_size=group_size,
                threshold=leak_threshold,
                expected_embedder_fingerprint=embedder.fingerprint(),
            )

        rows: list[tuple[str, str, dict[str, float]]] = []
        for cache_size, cache_name in ((0, "off"), (4096, "on")):
            sequential = make(cache_size, 8)
            batched = make(cache_size, CHUNKS)
            overlapped = make(cache_size, 8)

            def run_sequential(r: Retriever = sequential) -> int:
                for context in boundaries:
                    r.retrieve_next([context])
                return 1

            def run_batched(r: Retriever) -> int:
                r.retrieve_context([prompt])
                return 1

            def run_decode(r: Retriever = sequential) -> int:
                for context in boundaries:
                    r.retrieve_next([context])
                return CHUNKS

            run_sequential()  # warm-up: imports, thread start, page cache
            run_batched(overlapped)
            rows.append(
                ("prompt, sequential", cache_name, measure(run_sequential, sequential, args.rounds))
            )
            rows.append(
                (
                    "prompt, batched",
                    cache_name,
                    measure(lambda r=batched: run_batched(r), batched, args.rounds),
                )
            )
            rows.append(
                (
                    "prompt, batched + overlapped",
                    cache_name,
                    measure(lambda r=overlapped: run_batched(r), overlapped, args.rounds),
                )
            )
            rows.append(("decode step (per chunk)", cache_name, measure(run_decode, sequential, 3)))
            overlapped.close()
        print_table(args.count, threshold, args.rounds, rows)
        if threshold is not None and args.baseline_rounds > 0:
            compare_filters(
                lambda t, from_table: make(0, CHUNKS, t, from_table),
                prompt,
                threshold,
                args.baseline_rounds,
            )
        bank_store.close()


def print_table(
    count: int, threshold: float | None, rounds: int, rows: list[tuple[str, str, dict[str, float]]]
) -> None:
    """The per-phase table of the current implementation."""
    print(
        f"{count} references of shape {Config.from_name('small').memory_shape} (fp32) in "
        f"an HDF5Store, token ids from the reference table, ExactIndex dim 2048, k=5, "
        f"overfetch 3, threshold {threshold}, "
        f"torch threads {torch.get_num_threads()}; median of {rounds} rounds, ms"
    )
    columns = ["total", *PHASES, "hit rate"]
    header = f"| {'scenario':<30} | cache | " + " | ".join(f"{c:>8}" for c in columns)
    print(header + " | ÷ sequential |")
    print("|" + "-" * 32 + "|-------|" + "|".join("-" * 10 for _ in columns) + "|--------------|")
    base = {cache: m["total"] for name, cache, m in rows if name == "prompt, sequential"}
    for name, cache, m in rows:
        cells = " | ".join(f"{m[c]:>8.2f}" for c in columns)
        ratio = f"{m['total'] / base[cache]:>12.2f}" if name.startswith("prompt") else " " * 12
        print(f"| {name:<30} | {cache:<5} | {cells} | {ratio} |")


if __name__ == "__main__":
    main()
