"""A bank at growing sizes: peak memory of every process and references per second, side by side.

`m3 build-memory` with the tiny model (random weights) on generated knowledge bases of
10⁴, 10⁵ and 4×10⁵ references (JSONL files of 10,000 documents each, ~4 references a
document), one size after another, each build in a fresh process. For each size it prints
the wall time of every stage (reading and checking the documents, the reference table,
encoding, the embedder's fit, embedding, the index), references per second, and the peak
resident memory of the build's process per stage (Linux's VmHWM, reset at every stage
through `/proc/self/clear_refs`) and of its children (ranks started by Lightning), the
index's stage reported apart. The goal (issue 18): peak memory at 4×10⁵ within 1.5× of 10⁴
leaving the index aside, and references/s at 4×10⁵ at least 0.8× of 10⁴.

    OMP_NUM_THREADS=1 python benchmarks/bank_scale.py                  # all three sizes
    OMP_NUM_THREADS=1 python benchmarks/bank_scale.py --sizes 10000 100000
    python benchmarks/bank_scale.py --sizes 2000 --ranks 2            # two ranks (DDP, gloo)

Runs by hand, not in CI. Needs Linux (`/proc`). The embedder is the tiny recipe's hashed
n-grams at `--dim` (1024 by default, 4096 in the recipe: 4×10⁵ × 4096 float32 is 6.5 GB of
vectors, twice, on disk).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [str(ROOT / "recipes/tiny/base.yaml"), str(ROOT / "recipes/tiny/build-memory.yaml")]
DOCUMENTS_PER_FILE = 10_000
STAGES = ("check", "table", "encode", "fit", "embed", "index", "finish")


def write_knowledge(folder: Path, references: int, seed: int = 0) -> int:
    """Generated documents of 385–512 ASCII characters (4 references of 128 bytes each)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "sul", "tor", "va", "quin", "dar", "el", "os", "ith"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
                    for _ in range(6000)})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    documents = references // 4
    for start in range(0, documents, DOCUMENTS_PER_FILE):
        with (folder / f"kb-{start // DOCUMENTS_PER_FILE:04d}.jsonl").open("w") as out:
            for i in range(start, min(start + DOCUMENTS_PER_FILE, documents)):
                length, text = rng.randint(385, 512), f"Record {i}."
                while len(text) < length:
                    text += " " + rng.choice(words)
                out.write(json.dumps({"id": f"d{i}", "text": text[:length]}) + "\n")
    return documents


def memory() -> dict[str, int]:
    """This process's resident memory now and at its peak since the last reset, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def one(args: argparse.Namespace) -> None:
    """One build in this process, its stages timed and their peak memory recorded."""
    import m3.bank.build as build
    from m3.recipes import load_recipe

    marks: list[tuple[str, float, dict]] = []

    def enter(stage: str) -> None:
        marks.append((stage, time.perf_counter(), memory()))
        reset_peak()

    def timed(name: str, stage: str, after: str | None = None):
        original = getattr(build, name)

        def wrapper(*a, **k):
            enter(stage)
            try:
                return original(*a, **k)
            finally:
                if after:
                    enter(after)

        setattr(build, name, wrapper)

    timed("write_table", "table", after="encode")
    timed("fit_embedder", "fit")
    timed("embed_references", "embed", after="finish")
    timed("index_from_shards", "index", after="finish")
    knowledge = f"[{{class_path: files, init_args: {{paths: [{args.kb}]}}}}]"
    overrides = [
        f"output={args.out}", f"training.init_weights={args.weights}",
        f"data.knowledge={knowledge}", f"embedder.init_args.dim={args.dim}",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if args.ranks > 1:
        overrides += [f"trainer.devices={args.ranks}", "trainer.strategy=ddp"]
    recipe = load_recipe(RECIPES, overrides)
    enter("check")
    start = time.perf_counter()
    build.build_memory(recipe, batch_size=64)
    enter("end")
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    seconds = time.perf_counter() - start
    stages: dict[str, dict] = {}
    for (stage, at, _), (_, until, after) in itertools.pairwise(marks):
        entry = stages.setdefault(stage, {"seconds": 0.0, "peak": 0})
        entry["seconds"] += until - at
        entry["peak"] = max(entry["peak"], after["VmHWM"])
    before, after = (
        [m for s, _, m in marks if s == "index"],
        [m for s, _, m in marks if s == "finish"],
    )
    done = json.loads((args.out / "done.json").read_text())
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    sizes = {name: sum(p.stat().st_size for p in (args.out / name).rglob("*") if p.is_file())
             for name in ("embeddings", "index", "references")}  # fmt: skip
    print("RESULT " + json.dumps({
        "references": done["references"], "seconds": seconds, "stages": stages,
        "index_rss": after[0]["VmRSS"] - before[0]["VmRSS"] if before and after else None,
        "index_rss_file": after[0]["RssFile"] - before[0]["RssFile"] if before and after else None,
        "children_peak": children, "bytes": sizes,
        "store_bytes": done["store_bytes"],
        "marks": [(stage, {k: v >> 20 for k, v in m.items()}) for stage, _, m in marks],
    }), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 400_000])
    parser.add_argument("--dim", type=int, default=1024, help="the hashed n-gram embedder's")
    parser.add_argument("--ranks", type=int, default=1, help="Lightning DDP ranks (gloo)")
    parser.add_argument("--keep", type=Path, default=None, help="build under this folder")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kb", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    import torch

    from m3.model.memory3 import Memory3
    from m3.recipes import load_recipe

    root = args.keep or Path(tempfile.mkdtemp(prefix="m3-bank-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights = root / "model.pt"
    torch.save(Memory3(load_recipe(RECIPES).model.config()).state_dict(), weights)
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.ranks} rank(s), "
          f"embedder dim {args.dim}", flush=True)  # fmt: skip
    results = {}
    for size in args.sizes:
        kb, out = root / f"kb-{size}", root / f"bank-{size}"
        shutil.rmtree(out, ignore_errors=True)
        write_knowledge(kb, size)
        command = [
            sys.executable, __file__, "--one", "--kb", str(kb), "--weights", str(weights),
            "--out", str(out), "--dim", str(args.dim), "--ranks", str(args.ranks),
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            sys.exit(f"the build of {size} references failed:\n{run.stderr[-3000:]}")
        results[size] = json.loads(lines[-1][7:])
        r = results[size]
        print(
            f"{size:>9,}: {r['references']:,} references in {r['seconds']:.0f} s, "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(kb, ignore_errors=True)
    report(results, args.sizes)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


def report(results: dict[int, dict], sizes: list[int]) -> None:
    mib = 2**20
    first = results[sizes[0]]

    def row(label: str, values: list[float], spec: str = ">14.0f") -> None:
        print(f"{label:<34}" + "".join(f"{v:{spec}}" for v in values))

    print("\n" + f"{'':<34}" + "".join(f"{s:>14,}" for s in sizes))
    row("references", [results[s]["references"] for s in sizes], ">14,")
    row("wall seconds", [results[s]["seconds"] for s in sizes], ">14.1f")
    rate = [results[s]["references"] / results[s]["seconds"] for s in sizes]
    row("references / s (whole build)", rate, ">14.1f")
    row("  ÷ the first size", [r / rate[0] for r in rate], ">14.2f")
    stages = [stage for stage in STAGES if stage in first["stages"]]
    for stage in stages:
        row(f"  refs/s, {stage}", [
            results[s]["references"] / max(results[s]["stages"][stage]["seconds"], 1e-9)
            for s in sizes
        ])  # fmt: skip
    print()
    for stage in stages:
        row(f"peak RSS MiB, {stage}", [results[s]["stages"][stage]["peak"] / mib for s in sizes])
    outside = [max(v["peak"] for k, v in results[s]["stages"].items() if k != "index")
               for s in sizes]  # fmt: skip
    row("peak RSS MiB, all but the index", [o / mib for o in outside])
    row("  ÷ the first size", [o / outside[0] for o in outside], ">14.2f")
    row("index: RSS added, MiB", [(results[s]["index_rss"] or 0) / mib for s in sizes])
    row("  of it file-backed (mapped)", [(results[s]["index_rss_file"] or 0) / mib for s in sizes])
    row("children peak RSS MiB", [results[s]["children_peak"] / mib for s in sizes])
    for name in ("references", "embeddings", "index"):
        row(f"disk MiB, {name}", [results[s]["bytes"][name] / mib for s in sizes], ">14.1f")
    row("disk MiB, store", [results[s]["store_bytes"] / mib for s in sizes], ">14.1f")


if __name__ == "__main__":
    main()
