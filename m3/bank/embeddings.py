"""Each rank embeds its own references into shards of vectors; the index is built from them.

`m3 build-memory` embeds the references of its reference table (`m3.bank.table`) in ranges
of `m3.bank.vectors.REFERENCES_PER_SHARD` ids: range `n` belongs to rank `n % world_size`,
whatever the number of ranks, so a build on any number of ranks writes the same shards. The
bank folder's `embeddings/` holds:

| file | what |
|---|---|
| `fit-{n:05d}.npz` | range `n`'s statistics for fitting the embedder (`Embedder.fit_partial`) |
| `shard-{n:05d}/vectors.npy` | the `(rows, dim)` float32 vectors of range `n`, memory-mapped |
| `shard-{n:05d}/meta.json` | first id, rows, crc32, the embedder's and knowledge's fingerprints |
| `manifest.json` | written last, by the rank that builds the index: every shard and the counts |

1. **Fit.** An embedder that fits (the hashed n-gram's IDF) is fitted in one streaming pass
   split across the ranks: each counts its own ranges (`fit_partial`, a file per range),
   then every rank merges all of them (`fit_merge`): exactly the fit on all references at
   once. An embedder whose fit cannot be split fits on all the texts in every rank.
2. **Embed.** Each rank embeds its ranges through Lightning's `Trainer.predict`
   (`EmbeddingModule`, batches that never cross a range); `EmbeddingWriter` writes each
   batch into its range's memory-mapped file and makes the shard visible by one rename of
   its folder once full. A killed rank leaves a temporary folder that the next run deletes;
   a resumed build embeds only the ranges without a sound shard.
3. **Index.** Once every shard is written, `m3.bank.vectors.index_from_shards` builds the
   index from them: `ExactIndex` and `ScannIndex` stream the shards into one memory-mapped
   array (`add_parts`), any other index (`MilvusIndex`) gets them inserted shard by shard.
   An index that records its embedder (`embedder_fingerprint`) gets the fitted embedder's.

`m3 verify` reads every shard against its crc32 (`m3.bank.vectors.EmbeddingShards`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from m3.bank.vectors import shard_name, shard_problem, shard_ranges, vectors_crc
from m3.core.errors import UserError
from m3.core.runs import process_alive

if TYPE_CHECKING:
    from m3.bank.table import ReferenceTable
    from m3.data.tokenizer import Tokenizer
    from m3.retrieval.embedders import Embedder

#: Texts embedded per batch of the predict loop.
EMBEDDING_BATCH = 1024


def _texts(table: Sequence[Any], tokenizer: Tokenizer, start: int, end: int) -> Iterator[str]:
    for i in range(start, end):
        yield tokenizer.decode(table[i].ids)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _discard_dead_writers(folder: Path) -> None:
    """Delete the temporary files of writers that died (live ones keep theirs)."""
    for stale in folder.glob("*.tmp*"):
        try:
            pid = int(stale.name.split(".tmp")[0].split(".")[-1])
        except ValueError:
            continue
        if not process_alive(pid):
            _remove(stale)


# ------------------------------------------------------------------------------ fitting
def fit_embedder(
    embedder: Embedder,
    table: ReferenceTable,
    tokenizer: Tokenizer,
    folder: Path,
    *,
    rank: int,
    world: int,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> None:
    """Fit the embedder on every reference's text, the work split across the ranks.

    Each rank counts its own ranges first (`fit_partial`, one file per range, kept for a
    resume), waits for the others (`barrier`, under a distributed strategy), counts any
    range still missing (ranks launched by hand), then merges every range's counts.

    Args:
        embedder: The recipe's embedder, not fitted yet.
        table: The reference table.
        tokenizer: Decodes the references' token ids to their texts.
        folder: The bank's `embeddings/` folder (created).
        rank: This rank.
        world: Ranks in the build.
        barrier: Waits for every rank (a strategy's `barrier`); None without one.
        progress: Show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    if not embedder.needs_fit:
        return
    from m3.retrieval.embedders import Embedder

    if type(embedder).fit_partial is Embedder.fit_partial:  # a fit that cannot be split
        embedder.fit(_texts(table, tokenizer, 0, len(table)))
        return
    folder.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(len(table))
    stamp = {"knowledge": table.knowledge, "embedder": embedder.fingerprint()}

    def count(numbers: list[int]) -> None:
        for n in tqdm(numbers, desc="fitting the embedder", disable=not progress or not numbers):
            if _read_part(folder, n, ranges[n], stamp) is None:
                start, end = ranges[n]
                part = embedder.fit_partial(_texts(table, tokenizer, start, end))
                _write_part(folder, n, ranges[n], stamp, part)

    count(list(range(rank % max(world, 1), len(ranges), max(world, 1))))
    if barrier is not None:
        barrier()
    count(list(range(len(ranges))))
    parts = [_read_part(folder, n, ranges[n], stamp) for n in range(len(ranges))]
    embedder.fit_merge([p for p in parts if p is not None])


def _part_path(folder: Path, n: int) -> Path:
    return folder / f"fit-{n:05d}.npz"


def _write_part(
    folder: Path, n: int, span: tuple[int, int], stamp: dict, part: dict[str, Tensor] | None
) -> None:
    if part is None:
        raise UserError("the embedder's fit_partial returned None: it cannot be split")
    meta = {**stamp, "first": span[0], "end": span[1]}
    path = _part_path(folder, n)
    tmp = folder / f"fit-{n:05d}.{os.getpid()}.tmp.npz"
    arrays = {f"part_{key}": value.cpu().numpy() for key, value in part.items()}
    np.savez(tmp, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    os.replace(tmp, path)


def _read_part(
    folder: Path, n: int, span: tuple[int, int], stamp: dict
) -> dict[str, Tensor] | None:
    """Range `n`'s counts, or None when missing, damaged or of other inputs."""
    try:
        with np.load(_part_path(folder, n)) as data:
            meta = json.loads(str(data["meta"]))
            if meta != {**stamp, "first": span[0], "end": span[1]}:
                return None
            return {k[5:]: torch.from_numpy(data[k].copy()) for k in data.files if k != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zlib.error):
        return None


# ------------------------------------------------------------------------------ embedding
class EmbeddingModule(L.LightningModule):
    """Embeds batches of reference texts in `predict_step` (autocast off: exact vectors).

    Args:
        embedder: The fitted embedder (kept as a plain attribute: it runs where it runs).
    """

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Embed one batch.

        Args:
            batch: `shard` (its number), `ids` `(N,)` and `texts` (`N` strings).
            batch_idx: The batch's position.

        Returns:
            `shard`, `ids` `(N,)` and `vectors` `(N, dim)` float32 on the CPU.
        """
        with torch.autocast(self.device.type, enabled=False):
            vectors = self.embedder.embed(batch["texts"])
        return {"shard": batch["shard"], "ids": batch["ids"].cpu(),
                "vectors": vectors.float().cpu()}  # fmt: skip


class EmbeddingBatches(torch.utils.data.Dataset):
    """Batches of the pending shards' references, decoded to text, one dataset item per batch.

    Args:
        table: The reference table.
        tokenizer: Decodes token ids to text.
        shards: `(n, first, end)` of each shard to embed.
        batch_size: Texts per batch (a batch never crosses a shard).
    """

    def __init__(
        self, table: ReferenceTable, tokenizer: Tokenizer,
        shards: Sequence[tuple[int, int, int]], *, batch_size: int,
    ) -> None:  # fmt: skip
        self.table, self.tokenizer = table, tokenizer
        self.batches = [
            (n, s, min(s + batch_size, end))
            for n, first, end in shards
            for s in range(first, end, batch_size)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One batch: `shard`, `ids` `(N,)` and `texts`."""
        n, start, end = self.batches[index]
        return {"shard": n, "ids": torch.arange(start, end),
                "texts": list(_texts(self.table, self.tokenizer, start, end))}  # fmt: skip


class EmbeddingWriter(BasePredictionWriter):
    """Writes each embedded batch into its shard; a full shard appears by one rename.

    Args:
        folder: The bank's `embeddings/` folder.
        table: The reference table.
        embedder: The fitted embedder (its fingerprint is recorded in every shard).
        shard: `(rank, world_size)` for ranks launched by hand; from the trainer when None.
    """

    def __init__(
        self, folder: Path, table: ReferenceTable, embedder: Embedder, *,
        shard: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(write_interval="batch")
        self.folder, self.table, self.shard = Path(folder), table, shard
        self.stamp = {"knowledge": table.knowledge, "embedder": embedder.fingerprint(),
                      "dim": embedder.dim}  # fmt: skip
        self.ranges = shard_ranges(len(table))
        self._open: dict[int, tuple[Path, np.ndarray, int]] = {}
        self.written = 0

    def pending(self, trainer: L.Trainer) -> list[tuple[int, int, int]]:
        """This rank's shards that are not written yet (unsound ones are deleted first).

        Args:
            trainer: The predict run's trainer (gives the rank unless `shard` was given).

        Returns:
            `(n, first, end)` of each.
        """
        rank, world = self.shard or (trainer.global_rank, trainer.world_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        _discard_dead_writers(self.folder)
        todo = []
        for n in range(rank % world, len(self.ranges), world):
            if shard_problem(self.folder, n, self.ranges[n], self.stamp) is not None:
                _remove(self.folder / shard_name(n))
                todo.append((n, *self.ranges[n]))
        return todo

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Write one batch's vectors; rename its shard into place once full (a Lightning hook).

        Args:
            trainer: The predict run's trainer (unused).
            pl_module: The `EmbeddingModule` (unused).
            prediction: `EmbeddingModule.predict_step`'s: `shard`, `ids`, `vectors`.
            batch_indices: Lightning's sample indices (unused).
            batch: The batch (unused).
            batch_idx: The batch's position (unused).
            dataloader_idx: The dataloader's position (unused).
        """
        n = int(prediction["shard"])
        first, end = self.ranges[n]
        if n not in self._open:
            tmp = self.folder / f"{shard_name(n)}.{os.getpid()}.tmp"
            _remove(tmp)
            tmp.mkdir()
            shape = (end - first, int(self.stamp["dim"]))
            vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+",
                                                dtype=np.float32, shape=shape)  # fmt: skip
            self._open[n] = (tmp, vectors, 0)
        tmp, vectors, filled = self._open[n]
        ids = prediction["ids"].numpy()
        vectors[ids - first] = prediction["vectors"].numpy()
        filled += len(ids)
        self.written += len(ids)
        self._open[n] = (tmp, vectors, filled)
        if filled == end - first:
            vectors.flush()
            crc = vectors_crc(vectors)
            del self._open[n], vectors
            meta = {**self.stamp, "first": first, "rows": end - first, "crc32": crc}
            (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
            try:
                os.rename(tmp, self.folder / shard_name(n))
            except OSError:  # another writer finished it first: the same vectors
                shutil.rmtree(tmp, ignore_errors=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Drop the unfinished shards' files (a Lightning hook); a resume embeds them again.

        Args:
            trainer: The predict run's trainer (unused).
            pl_module: The module (unused).
            exception: What stopped the run; Lightning re-raises it.
        """
        for tmp, _, _ in self._open.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self._open.clear()


class PendingEmbeddings(L.LightningDataModule):
    """The shards this rank has still to embed, asked at predict time.

    Args:
        writer: The writer that knows the shards.
        tokenizer: Decodes token ids to text.
        batch_size: Texts per batch.
    """

    def __init__(self, writer: EmbeddingWriter, tokenizer: Tokenizer, *, batch_size: int):
        super().__init__()
        self.writer, self.tokenizer, self.batch_size = writer, tokenizer, batch_size

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """One item per batch of this rank's pending shards."""
        pending = self.writer.pending(self.trainer)
        dataset = EmbeddingBatches(
            self.writer.table, self.tokenizer, pending, batch_size=self.batch_size
        )
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False)


def embed_references(
    make_trainer: Callable[[L.Callback], L.Trainer],
    embedder: Embedder,
    table: ReferenceTable,
    tokenizer: Tokenizer,
    folder: Path,
    *,
    shard: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> int:
    """Embed this rank's shards that are not written yet, through `Trainer.predict`.

    Args:
        make_trainer: Builds the predict run's trainer with the writer as a callback.
        embedder: The fitted embedder.
        table: The reference table.
        tokenizer: Decodes token ids to text.
        folder: The bank's `embeddings/` folder.
        shard: `(rank, world_size)` for ranks launched by hand; from the trainer when None.
        batch_size: Texts per batch; `EMBEDDING_BATCH` when None.

    Returns:
        How many references this run embedded.
    """
    writer = EmbeddingWriter(folder, table, embedder, shard=shard)
    trainer = make_trainer(writer)
    with warnings.catch_warnings():  # the ids travel in the batches; a rank may have none
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        warnings.filterwarnings("ignore", message=".*Total length of `DataLoader`.*")
        batches = PendingEmbeddings(writer, tokenizer, batch_size=batch_size or EMBEDDING_BATCH)
        trainer.predict(EmbeddingModule(embedder), datamodule=batches, return_predictions=False)
    return writer.written
