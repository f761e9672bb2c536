"""Store reads: HDF5Store and InMemoryStore against the raw reads they are built on, side by side.

Batches of 5 × 64 = 320 random references (a prompt of 64 chunks, 5 memories each), for
tiny memories (`Config.from_name("tiny").memory_shape`) and paper-shaped ones
((22, 2, 8, 8, 80), 450,560 B in bf16), cold (the file dropped from the page cache before
every batch) and warm. Each method reads the same ids in the same round, in a shuffled order,
so ratios compare like with like:

- HDF5Store.read ÷ raw `os.preadv` of the same rows from the same file, single thread
  (goal ≥ 0.8), with each `verify_reads` mode: crc32 on every read ("always"), on a row's
  first read in the process ("first", the default, measured in its steady state: every row
  was read once before; a first read costs what "always" costs) and never ("never": stored
  id and marker only);
- InMemoryStore.read ÷ `index_select` on plain tensors of the same data (goal ≥ 0.8);
- a bank after 10 edits (`LayeredStore`: the store with 10 edit layers on top, each
  rewriting 1% of the references, as `m3 edit` writes them) ÷ the raw reads, what serving
  an edited bank costs (the layers' small files stay in the page cache when cold);
- h5py fancy indexing of the same rows, for reference.

    python benchmarks/store_read.py [--paper-count 4000] [--tiny-count 20000] [--dir /tmp]
        [--rounds 20] [--threads 1]

The paper-shaped file takes about paper-count × 453 KB (1.8 GB by default); files are
deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from m3.backends.base import StoreInfo
from m3.backends.hdf5_store import HDF5Store
from m3.backends.in_memory import InMemoryStore
from m3.backends.sharded import LayeredStore
from m3.core.memories import SparseMemory
from m3.data.chunking import Reference
from m3.model.config import Config

BATCH = 5 * 64
PAPER_SHAPE = (22, 2, 8, 8, 80)


def random_memory(count: int, shape: tuple[int, ...], generator: torch.Generator) -> SparseMemory:
    layers, _, heads, tokens, dim = shape
    size = (count, layers, heads, tokens, dim)
    bits = torch.randint(-(2**15), 2**15, (2, *size), dtype=torch.int16, generator=generator)
    keys, values = bits.view(torch.bfloat16)
    valid = torch.ones(count, tokens, dtype=torch.bool)
    positions = torch.randint(0, 128, (count, layers, heads, tokens), generator=generator)
    return SparseMemory(keys, values, valid, positions)


def build(path: Path, shape: tuple[int, ...], count: int) -> InMemoryStore:
    """Write the same random memories to an HDF5 file and to an in-memory store."""
    info = StoreInfo(memory_shape=shape, dtype="bfloat16")
    in_memory = InMemoryStore(info, capacity=count)
    generator = torch.Generator().manual_seed(0)
    step = max(1, (64 << 20) // (2 * int(np.prod(shape)) + 1))
    with HDF5Store(path, info=info, mode="w") as store:
        for start in range(0, count, step):
            ids = list(range(start, min(count, start + step)))
            memory = random_memory(len(ids), shape, generator)
            references = [Reference("doc", i * 128, i * 128 + 128, (1,) * 128) for i in ids]
            store.write(ids, memory, references)
            in_memory.write(ids, memory, references)
        store.mark_complete()  # also syncs, so that the pages can be dropped
    return in_memory


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(
    methods: dict[str, Callable[[np.ndarray], object]],
    *,
    path: Path,
    count: int,
    rounds: int,
    cold: bool,
    skip_cold: set[str],
) -> dict[str, float]:
    """Median refs/s of each method; every round draws one id batch that all methods read."""
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        if not cold:
            method(rng.choice(count, BATCH, replace=False))  # warm the page cache and code
    names = list(methods)
    for _ in range(rounds):
        ids = rng.choice(count, BATCH, replace=False)
        rng.shuffle(names)
        for name in names:
            method = methods[name]
            if cold and name in skip_cold:
                continue
            if cold:
                drop_cache(path)
            start = time.perf_counter()
            method(ids)
            times[name].append(time.perf_counter() - start)
    return {name: BATCH / statistics.median(t) for name, t in times.items() if t}


def edited(path: Path, store: HDF5Store, shape: tuple[int, ...], edits: int = 10) -> LayeredStore:
    """The store with `edits` layers on top, each rewriting a random 1% of its references."""
    rng, generator = np.random.default_rng(2), torch.Generator().manual_seed(2)
    layers: list[HDF5Store] = []
    for n in range(1, edits + 1):
        ids = np.sort(rng.choice(len(store), max(1, len(store) // 100), replace=False)).tolist()
        layer_path = path.with_name(f"{path.stem}.edit-{n}.h5")
        with HDF5Store(layer_path, info=store.info, mode="w") as layer:
            references = [Reference("doc", i * 128, i * 128 + 128, (2,) * 128) for i in ids]
            layer.write(ids, random_memory(len(ids), shape, generator), references)
            layer.mark_complete()
        layers.append(HDF5Store(layer_path))
    return LayeredStore([store, *layers], [[]] * (edits + 1))


def methods_for(path: Path, stores: dict[str, HDF5Store], in_memory: InMemoryStore):
    store = stores["first"]
    row_bytes = store.layout.row_bytes
    offsets = np.array([store.row_location(i)[0] for i in range(len(store))], dtype=np.int64)
    fd = os.open(path, os.O_RDONLY)
    buffer = np.empty((BATCH, row_bytes), dtype=np.uint8)

    def raw(ids: np.ndarray) -> None:
        for j, offset in enumerate(np.sort(offsets[ids]).tolist()):
            os.preadv(fd, [buffer[j]], offset)

    file = h5py.File(path, "r")
    segments = [file["payload"][name] for name in sorted(file["payload"])]
    starts = np.array([s.id.get_offset() for s in segments], dtype=np.int64)

    def h5py_fancy(ids: np.ndarray) -> None:
        where = np.sort(offsets[ids])
        segment = np.searchsorted(starts, where, side="right") - 1
        for s in np.unique(segment).tolist():
            rows = (where[segment == s] - starts[s]) // row_bytes
            segments[s][rows.tolist()]

    keys, values = in_memory._keys, in_memory._values
    valid, positions = in_memory._valid, in_memory._positions

    def plain_index_select(ids: np.ndarray) -> None:
        index = torch.from_numpy(ids)
        keys.index_select(0, index), values.index_select(0, index)
        valid.index_select(0, index), positions.index_select(0, index)

    methods = {
        "raw os.preadv (1 thread)": raw,
        **{
            f'HDF5Store.read, verify_reads="{mode}"': (
                lambda ids, s=s: s.read(torch.from_numpy(ids))
            )
            for mode, s in stores.items()
            if mode != "edited"
        },
        "LayeredStore.read, 10 edits": lambda ids: stores["edited"].read(torch.from_numpy(ids)),
        "h5py fancy indexing": h5py_fancy,
        "plain index_select": plain_index_select,
        "InMemoryStore.read": lambda ids: in_memory.read(torch.from_numpy(ids)),
    }
    return methods, lambda: (os.close(fd), file.close())


def run(name: str, shape: tuple[int, ...], count: int, directory: Path, rounds: int) -> list[str]:
    path = directory / f"store_read_{name}.h5"
    started = time.perf_counter()
    in_memory = build(path, shape, count)
    written = time.perf_counter() - started
    stores = {mode: HDF5Store(path, verify_reads=mode) for mode in ("always", "first", "never")}
    for start in range(0, count, BATCH):  # "first" in its steady state: every row read once
        stores["first"].read(torch.arange(start, min(count, start + BATCH)))
    stores["edited"] = edited(path, stores["first"], shape)
    methods, close = methods_for(path, stores, in_memory)
    slow = {"h5py fancy indexing"}
    fast = {k: v for k, v in methods.items() if k not in slow}
    warm = measure(fast, path=path, count=count, rounds=rounds, cold=False, skip_cold=set())
    warm |= measure({k: methods[k] for k in slow}, path=path, count=count, rounds=2, cold=False,
                    skip_cold=set())  # fmt: skip
    in_ram = {"plain index_select", "InMemoryStore.read"}
    cold = measure(fast, path=path, count=count, rounds=max(3, rounds // 2), cold=True,
                   skip_cold=in_ram)  # fmt: skip
    cold |= measure({k: methods[k] for k in slow}, path=path, count=count, rounds=1, cold=True,
                    skip_cold=set())  # fmt: skip
    close()
    row_bytes = stores["first"].layout.row_bytes
    for store in stores.values():
        store.close()
    size = path.stat().st_size
    for file in path.parent.glob(f"{path.stem}*.h5"):
        file.unlink()
    in_ram = {"plain index_select", "InMemoryStore.read"}
    raw = "raw os.preadv (1 thread)"
    baselines = {m: "plain index_select" if m in in_ram else raw for m in methods}
    lines = [
        f"\n{name}: memory shape {shape}, bf16, {row_bytes:,} B per row, "
        f"{count:,} references, file {size / 1e9:.2f} GB written in {written:.1f} s",
        "| method | cold refs/s | warm refs/s | cold ratio | warm ratio |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        base = baselines[method]
        c, w = cold.get(method), warm.get(method)
        cold_ratio = f"{c / cold[base]:.2f}" if c and base in cold else "—"
        lines.append(
            f"| {method} | {f'{c:,.0f}' if c else '—'} | {w:,.0f} | {cold_ratio} | "
            f"{w / warm[base]:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-count", type=int, default=4000)
    parser.add_argument("--tiny-count", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=20, help="timed batches per warm method")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"batches of {BATCH} random references, torch threads {args.threads}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; ratios: stores on disk ÷ raw "
        "os.preadv, stores in RAM ÷ plain index_select"
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        tiny = Config.from_name("tiny").memory_shape
        lines += run("tiny", tiny, args.tiny_count, Path(directory), args.rounds)
        lines += run("paper", PAPER_SHAPE, args.paper_count, Path(directory), args.rounds)
    lines.append(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
