"""MilvusIndex on milvus-lite (FLAT and IVF_FLAT) against ExactIndex: recall@5 and queries/s.

Measured side by side in one run and printed as one table: for each index the time to add
and build, recall@5 against ExactIndex on the same queries, and queries/s in batches of
`--batch`. Data: clustered vectors (`benchmarks/retrieval.py`'s generator: Gaussian clusters
around random centres, L2-normalised) of the default embedder's dimension (2048, the
`hashed_ngram` embedder). The milvus-lite file goes to a temporary folder.

    python benchmarks/milvus.py                      # 10^5 × 2048: ~5-10 minutes on 2 cores
    python benchmarks/milvus.py --n 20000 --dim 384  # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval import clustered, recall_at

from m3.backends.exact_index import ExactIndex
from m3.backends.milvus_index import MilvusIndex


def queries_per_second(index, queries: torch.Tensor, batch: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, queries.shape[0], batch):
            index.search(queries[i : i + batch], 5)
        times.append(time.perf_counter() - start)
    return queries.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=2048, help="default: HashedNgramEmbedder's")
    parser.add_argument("--clusters", type=int, default=None, help="default: n / 100")
    parser.add_argument("--noise", type=float, default=0.3, help="cluster spread (per coord.)")
    parser.add_argument("--queries", type=int, default=1000, help="for recall and speed")
    parser.add_argument("--batch", type=int, default=100, help="queries per search call")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists; default 4·sqrt(n)")
    parser.add_argument("--nprobe", type=int, default=None, help="default: nlist / 16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clusters = args.clusters or max(1, args.n // 100)
    nlist = args.nlist or int(4 * args.n**0.5)
    nprobe = args.nprobe or max(1, nlist // 16)
    vectors = clustered(args.n, args.dim, clusters, args.noise, seed=0)
    queries = clustered(args.queries, args.dim, clusters, args.noise, seed=1)
    ids = torch.arange(args.n)
    print(f"{args.n:,} × {args.dim} clustered vectors ({clusters:,} clusters), "
          f"{args.queries} queries in batches of {args.batch}, top 5")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"{tmp}/bench.db"
        indexes = [
            ("ExactIndex", lambda: ExactIndex(args.dim)),
            ("MilvusIndex FLAT (lite)", lambda: MilvusIndex(args.dim, uri=uri)),
            (f"MilvusIndex IVF_FLAT nlist {nlist} nprobe {nprobe} (lite)",
             lambda: MilvusIndex(args.dim, uri=uri, index_type="IVF_FLAT",
                                 index_params={"nlist": nlist},
                                 search_params={"nprobe": nprobe})),
        ]  # fmt: skip
        truth = None
        for name, make in indexes:
            start = time.perf_counter()
            index = make()
            for i in range(0, args.n, 10_000):
                index.add(vectors[i : i + 10_000], ids[i : i + 10_000])
            index.build()
            build = time.perf_counter() - start
            found = torch.cat([index.search(queries[i : i + args.batch], 5).ids
                               for i in range(0, args.queries, args.batch)])  # fmt: skip
            truth = found if truth is None else truth
            qps = queries_per_second(index, queries, args.batch, args.repeats)
            rows.append((name, build, recall_at(truth, found), qps))
            print(f"  {name}: add + build {build:.1f} s, recall@5 {rows[-1][2]:.4f}, "
                  f"{qps:,.0f} queries/s", flush=True)  # fmt: skip
            if isinstance(index, MilvusIndex):
                index.close()  # drops its unsaved collection
            del index
    exact_qps = rows[0][3]
    print()
    print("| index | add + build (s) | recall@5 vs exact | queries/s | ÷ exact |")
    print("|---|---|---|---|---|")
    for name, build, recall, qps in rows:
        print(f"| {name} | {build:.1f} | {recall:.4f} | {qps:,.0f} | {qps / exact_qps:.2f} |")


if __name__ == "__main__":
    main()
