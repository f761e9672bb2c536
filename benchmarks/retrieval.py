"""Retrieval: ScannIndex vs calling ScaNN directly, recall against exact search, the overlap filter.

Everything is measured side by side in one run and printed as one table:

- ScannIndex ÷ ScaNN called directly (same parameters, same data, its own build), queries/s
  in batches of 1024 (goal ≥ 0.9: the wrapper's id mapping and checks must cost little);
- recall@5 of both against ExactIndex on a sample of queries (goal ≥ 0.95);
- ExactIndex queries/s;
- the leakage filter (m3.retrieval.overlap) in pairs/s: 64-token query chunks against 128-token
  references (evaluation), and a 2048-token training sequence against its 32 references.

Data: clustered vectors (Gaussian clusters around random centres, then L2-normalised);
on uniformly random vectors every approximate method stays at recall ≤ 0.5.

    python benchmarks/retrieval.py --n 100000     # quick: ~1-2 minutes on 2 cores
    python benchmarks/retrieval.py                # 1M × 384, as in MEASURED.md: ~6-10 minutes
"""

from __future__ import annotations

import argparse
import math
import pydoc_data.topics
import statistics
import time

import numpy as np
import torch

from m3.backends.exact_index import ExactIndex
from m3.backends.scann_index import ScannIndex, native_stderr_to_log
from m3.data.tokenizer import HFTokenizer
from m3.retrieval.overlap import exceeds, leak_mask, overlap


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=torch.Generator().manual_seed(12345))
    out = torch.empty(n, dim)
    for start in range(0, n, 100_000):  # in slices: one noise tensor of 1M × 384 is 1.5 GB
        size = min(100_000, n - start)
        labels = torch.randint(0, clusters, (size,), generator=g)
        out[start : start + size] = centres[labels] + noise * torch.randn(size, dim, generator=g)
    return torch.nn.functional.normalize(out, dim=1)


def recall_at(truth: torch.Tensor, found: torch.Tensor) -> float:
    k = truth.shape[1]
    pairs = zip(truth.tolist(), found.tolist(), strict=True)
    return float(np.mean([len(set(a) & set(b) - {-1}) / k for a, b in pairs]))


def direct_searcher(vectors: np.ndarray, params: dict):
    from scann.scann_ops.py import scann_ops_pybind

    threshold = params["anisotropic_quantization_threshold"]
    builder = scann_ops_pybind.builder(vectors, 10, "dot_product")
    builder = builder.tree(
        num_leaves=params["num_leaves"],
        num_leaves_to_search=params["num_leaves_to_search"],
        training_sample_size=params["training_sample_size"],
        spherical=params["spherical"],
    )
    builder = builder.score_ah(
        params["dimensions_per_block"],
        anisotropic_quantization_threshold=math.nan if threshold is None else threshold,
        training_sample_size=params["training_sample_size"],
    ).reorder(params["reorder_num_neighbors"])
    with native_stderr_to_log():
        return builder.build()


def text_token_ids() -> list[int]:
    texts = list(pydoc_data.topics.topics.values())
    tokenizer = HFTokenizer.train(texts, vocab_size=8192)
    return [i for text in texts for i in tokenizer.encode(text)]


def overlap_rates(ids: list[int], seed: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)

    def pairs(query: int, reference: int, count: int, leak: float) -> list[tuple[list, list]]:
        out = []
        for _ in range(count):
            a = int(rng.integers(0, len(ids) - query))
            if rng.random() < leak:  # a reference cut from around the query: a real leak
                b = max(0, a + int(rng.integers(-reference // 4, max(1, query - reference // 2))))
            else:
                b = int(rng.integers(0, len(ids) - reference))
            out.append((ids[a : a + query], ids[b : b + reference]))
        return out

    rows = []
    chunk_pairs = pairs(64, 128, 4000, leak=0.1)  # ≤ 0.5 overlap by length: never dropped
    for threshold, label in ((2 / 3, "2/3"), (0.9, "0.9")):
        start = time.perf_counter()
        flags = [exceeds(q, r, threshold) for q, r in chunk_pairs]
        rate = len(chunk_pairs) / (time.perf_counter() - start)
        rows.append(
            (
                f"overlap filter, 64-token chunk vs 128-token reference, threshold {label}",
                f"{rate:,.0f} pairs/s",
                f"{np.mean(flags):.1%} dropped",
            )
        )
    context_pairs = pairs(256, 128, 4000, leak=0.1)
    start = time.perf_counter()
    flags = [exceeds(q, r, 2 / 3) for q, r in context_pairs]
    rate = len(context_pairs) / (time.perf_counter() - start)
    rows.append(
        (
            "overlap filter, 256-token text vs 128-token reference, threshold 2/3",
            f"{rate:,.0f} pairs/s",
            f"{np.mean(flags):.1%} dropped",
        )
    )
    start = time.perf_counter()
    values = [overlap(q, r) for q, r in chunk_pairs[:1000]]
    rate = 1000 / (time.perf_counter() - start)
    rows.append(
        (
            "exact overlap() value, 64 vs 128",
            f"{rate:,.0f} pairs/s",
            f"median {np.median(values):.3f}",
        )
    )
    sequences = pairs(2048, 128, 64, leak=0.0)
    start = time.perf_counter()
    dropped = 0
    for q, _ in sequences:  # a training sequence against the 32 references of its chunks
        refs = [ids[s : s + 128] for s in rng.integers(0, len(ids) - 128, 31).tolist()]
        refs.append(q[1000:1128])  # one of them copied from the sequence itself
        dropped += int(leak_mask(q, refs, 0.9).sum())
    rate = 32 * len(sequences) / (time.perf_counter() - start)
    rows.append(
        (
            "overlap filter, 2048-token sequence vs its 32 references, 0.9",
            f"{rate:,.0f} pairs/s",
            f"{dropped / (32 * len(sequences)):.1%} dropped",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=None, help="default: n / 100")
    parser.add_argument("--noise", type=float, default=0.3, help="cluster spread (per coord.)")
    parser.add_argument("--batch", type=int, default=1024, help="queries per search call")
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--num-leaves", type=int, default=None, help="default: 2·sqrt(n)")
    parser.add_argument("--leaves-to-search", type=int, default=None, help="default: leaves/40")
    parser.add_argument("--reorder", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    n, dim = args.n, args.dim
    clusters = args.clusters or max(10, n // 100)
    leaves = args.num_leaves or round(2 * math.sqrt(n))  # 2000 at 1M, as in MEASURED.md
    search = args.leaves_to_search or max(1, round(leaves / 40))  # 50 at 1M
    print(
        f"n={n:,} dim={dim} clusters={clusters} leaves={leaves} search={search} "
        f"reorder={args.reorder} batch={args.batch} threads={torch.get_num_threads()}"
    )

    start = time.perf_counter()
    vectors = clustered(n, dim, clusters, args.noise, seed=0)
    queries = clustered(args.batch, dim, clusters, args.noise, seed=1)
    ids = torch.arange(n, dtype=torch.int64) * 7 + 3  # ids are not row numbers
    print(f"data: {time.perf_counter() - start:.1f} s", flush=True)

    index = ScannIndex(
        dim,
        num_leaves=leaves,
        num_leaves_to_search=search,
        reorder_num_neighbors=args.reorder,
        brute_force_below=0,
    )
    start = time.perf_counter()
    index.add(vectors, ids)
    index.build()
    index_build = time.perf_counter() - start
    print(f"ScannIndex build: {index_build:.1f} s {index.build_params}", flush=True)

    start = time.perf_counter()
    direct = direct_searcher(vectors.numpy(), index.build_params)
    direct_build = time.perf_counter() - start
    print(f"direct ScaNN build: {direct_build:.1f} s", flush=True)

    q_np = queries.numpy()

    def run_index() -> torch.Tensor:
        return index.search(queries, 5).ids

    def run_direct() -> np.ndarray:
        rows, _ = direct.search_batched_parallel(
            q_np,
            final_num_neighbors=5,
            leaves_to_search=search,
            pre_reorder_num_neighbors=args.reorder,
        )
        return rows

    run_index(), run_direct()  # warm up
    index_times, direct_times = [], []
    for _ in range(args.repeats):  # interleaved, so that drift on a shared machine hits both
        for fn, times in ((run_index, index_times), (run_direct, direct_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    index_qps = args.batch / statistics.median(index_times)
    direct_qps = args.batch / statistics.median(direct_times)
    best_ratio = min(direct_times) / min(index_times)  # best of each: least disturbed

    exact = ExactIndex(dim)
    exact.add(vectors, ids)
    sample = queries[: args.recall_queries]
    start = time.perf_counter()
    truth = exact.search(sample, 5).ids
    exact_qps = sample.shape[0] / (time.perf_counter() - start)
    index_recall = recall_at(truth, index.search(sample, 5).ids)
    direct_rows = run_direct()[: sample.shape[0]].astype(np.int64)
    direct_recall = recall_at(truth, ids[torch.from_numpy(direct_rows)])

    print("overlap filter ...", flush=True)
    overlap_rows = overlap_rates(text_token_ids(), seed=0)

    rows = [
        ("ScannIndex.search, batch 1024", f"{index_qps:,.0f} q/s", ""),
        ("ScaNN search_batched_parallel directly", f"{direct_qps:,.0f} q/s", ""),
        (
            "**ScannIndex ÷ direct** (medians; best-of-each)",
            f"**{index_qps / direct_qps:.2f}**; {best_ratio:.2f}",
            "goal ≥ 0.9",
        ),
        ("ScannIndex recall@5 vs exact", f"**{index_recall:.3f}**", "goal ≥ 0.95"),
        ("direct ScaNN recall@5 vs exact", f"{direct_recall:.3f}", ""),
        (
            "ExactIndex.search (fp32 matmul + topk)",
            f"{exact_qps:,.0f} q/s",
            f"ScannIndex is {index_qps / exact_qps:,.0f}× faster",
        ),
        ("build: ScannIndex / direct", f"{index_build:.1f} s / {direct_build:.1f} s", ""),
        *overlap_rows,
    ]
    print(f"\n{n:,} × {dim} clustered vectors, {torch.get_num_threads()} threads\n")
    print("| measure | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
