"""Store writes: what crash safety costs a build, and what a salvage costs after a kill.

A build writes its shard as `BankWriter` does: open with mode "w", one `write` per batch of
references, `mark_complete`, `close`. Side by side in one run, in turns:

- crash-safe (the product: the `<file>.writing` marker made and synced before the first
  write, the file synced and the marker removed at close) ÷ the same writes with the marker
  switched off (goal: ≥ 0.9, i.e. at most 10% slower);
- the salvage a writer runs after an unclean stop (every sound row copied into a fresh
  file), in seconds per GB of shard.

    python benchmarks/store_write.py [--count 4000] [--batch 64] [--rounds 5] [--dir /tmp]

Paper-shaped memories ((22, 2, 8, 8, 80) in bf16, 450,560 B a reference) and tiny ones.
Files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

import torch
from store_read import PAPER_SHAPE, random_memory
from timing import interleaved_medians

from m3.backends import hdf5_salvage, hdf5_store
from m3.backends.base import StoreInfo
from m3.backends.hdf5_store import HDF5Store
from m3.model.config import Config


def write_shard(path: Path, info: StoreInfo, batches: list, *, safe: bool) -> None:
    """Write every batch to a new store, as a build does."""
    saved = hdf5_store.begin_writing, hdf5_store.end_writing
    if not safe:  # the same writes without the marker and the syncs that go with it
        hdf5_store.begin_writing = hdf5_store.end_writing = lambda path, **_: None
    try:
        store = HDF5Store(path, info=info, mode="w")
        for ids, memory, references in batches:
            store.write(ids, memory, references)
        store.mark_complete()
        store.close()
    finally:
        hdf5_store.begin_writing, hdf5_store.end_writing = saved


def measure(shape: tuple[int, ...], count: int, batch: int, rounds: int, folder: Path) -> None:
    info = StoreInfo(memory_shape=shape, dtype="bfloat16")
    generator = torch.Generator().manual_seed(0)
    memory = random_memory(count, shape, generator)
    batches = []
    for start in range(0, count, batch):
        ids = torch.arange(start, min(start + batch, count))
        references = [("doc", int(i), int(i) + 1, (int(i) % 251,) * 32) for i in ids]
        batches.append((ids, memory[ids], references))
    paths = {"safe": folder / "safe.h5", "plain": folder / "plain.h5"}
    times = interleaved_medians(
        {
            "safe": lambda: write_shard(paths["safe"], info, batches, safe=True),
            "plain": lambda: write_shard(paths["plain"], info, batches, safe=False),
        },
        rounds,
    )
    size = paths["safe"].stat().st_size
    # a kill leaves the marker: the next writer salvages the whole shard
    record = {"pid": 0, "host": socket.gethostname()}  # a writer that is gone
    hdf5_salvage.marker_path(paths["safe"]).write_text(json.dumps(record))
    start = time.perf_counter()
    hdf5_salvage.salvage(paths["safe"], info=info, quantizer=None)
    salvage = time.perf_counter() - start
    row = size / count
    print(
        f"{shape!s:>22} {count:>6} refs ({row / 1e3:,.1f} kB each), batches of {batch}: "
        f"crash-safe {count / times['safe']:>9,.0f} refs/s, without marker "
        f"{count / times['plain']:>9,.0f} refs/s, ratio {times['plain'] / times['safe']:.3f} "
        f"(goal >= 0.9); salvage {salvage / (size / 1e9):.2f} s/GB"
    )


def main() -> None:
    """Parse the options and print one line per memory shape."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="paper-shaped references")
    parser.add_argument("--batch", type=int, default=64, help="references per write")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method")
    parser.add_argument("--dir", default=None, help="where to write the files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        measure(Config.from_name("tiny").memory_shape, args.count * 50, args.batch,
                args.rounds, folder)  # fmt: skip
        measure(PAPER_SHAPE, args.count, args.batch, args.rounds, folder)


if __name__ == "__main__":
    main()
