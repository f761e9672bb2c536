"""The Lightning parts of `m3 build-memory`: reference batches in, memories appended to shards.

`BankEncoder` (a LightningModule) encodes length-sorted batches of references through
`Trainer.predict`; `BankWriter` (a prediction writer) appends each batch to its rank's
HDF5 shard, resuming a shard that an interrupted build left, and marks a shard complete
after its last write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn

from m3.backends.base import StoreInfo
from m3.backends.hdf5_store import HDF5Store
from m3.core import registry
from m3.core.checks import right_pad
from m3.core.errors import UserError
from m3.core.references import Reference
from m3.memory.encoder import MemoryEncoder
from m3.model.memory3 import Memory3

if TYPE_CHECKING:
    from m3.memory.quantize import MemoryQuantizer

from m3.bank.layout import SHARD_FILE, shard_name
from m3.recipes.defaults import default_spec


class ReferenceBatches(torch.utils.data.Dataset):
    """Length-sorted batches of references, one dataset item per batch.

    Args:
        references: Every reference of the knowledge base (id = position).
        ids: The ids to encode.
        batch_size: References per batch.
    """

    def __init__(
        self, references: Sequence[Reference], ids: Sequence[int] | np.ndarray, *, batch_size: int
    ) -> None:
        self.references = references
        ids = np.asarray(ids, dtype=np.int64)
        if hasattr(references, "lengths"):  # a reference table: lengths without the tokens
            lengths = references.lengths()[ids]
        else:
            lengths = np.fromiter((len(references[i].ids) for i in ids.tolist()), np.int64)
        order = ids[np.lexsort((ids, lengths))]  # by length, then id: 8 bytes a reference
        self.batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """One batch: `ids` `(N,)`, right-padded `tokens` `(N, T)` and `lengths` `(N,)`."""
        ids = self.batches[index].tolist()
        tokens, lengths = right_pad([self.references[i].ids for i in ids], 0)
        return {"ids": torch.tensor(ids, dtype=torch.long), "tokens": tokens, "lengths": lengths}


class BankEncoder(L.LightningModule):
    """Encodes batches of references into sparse memories in `predict_step`.

    Args:
        model: The model whose memory layers encode (frozen).
        prefix: `(b,)` ids of the `<s>Reference:` prefix.
        encoder: The encoder; `MemoryEncoder()` when None.
        sparsifier: The sparsifier; `TopKSparsifier(k=memory_tokens)` when None.
    """

    def __init__(
        self,
        model: Memory3,
        prefix: Sequence[int],
        *,
        encoder: MemoryEncoder | None = None,
        sparsifier: nn.Module | None = None,
    ) -> None:
        super().__init__()

        self.model = model.eval().requires_grad_(False)
        self.encoder = encoder or registry.instantiate("encoder", default_spec("encoder"))
        self.sparsifier = sparsifier or registry.instantiate(
            "sparsifier", default_spec("sparsifier", model.config)
        )
        self.register_buffer(
            "prefix", torch.tensor(list(prefix), dtype=torch.long), persistent=False
        )

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """Encode one batch.

        Args:
            batch: `ids` `(N,)`, `tokens` `(N, T)`, `lengths` `(N,)`.
            batch_idx: The batch's position.

        Returns:
            `ids` `(N,)` and `memory`, their `SparseMemory` on the CPU.
        """
        dense = self.encoder(self.model, batch["tokens"], batch["lengths"], prefix=self.prefix)
        return {"ids": batch["ids"].cpu(), "memory": self.sparsifier(dense).to("cpu")}


class BankWriter(BasePredictionWriter):
    """Appends each predicted batch to its rank's shard; marks the shard complete at the end.

    Exactly one writer writes each shard file. The shard is opened in append mode, so a run
    that was interrupted resumes: `pending()` lists the references of the rank that the
    shard does not hold yet.

    Args:
        folder: The bank folder.
        info: What the shards hold (their `extra` records the rank and world size).
        references: Every reference of the knowledge base (id = position).
        shard: `(rank, world_size)` to write one shard whatever the trainer says (ranks
            launched by hand, one process each); from the trainer when None.
        quantizer: A trained quantizer: the shards keep codes (a quantized bank); None for
            raw keys and values.
    """

    def __init__(
        self,
        folder: str | Path,
        info: StoreInfo,
        references: Sequence[Reference],
        *,
        shard: tuple[int, int] | None = None,
        quantizer: MemoryQuantizer | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.folder, self.info, self.references = Path(folder), info, references
        self.shard = shard
        self.quantizer = quantizer
        self.store: HDF5Store | None = None
        self.written = 0

    def open(self, rank: int, world_size: int) -> HDF5Store:
        """Open (or create) the shard of a rank, checking it belongs to this build.

        Args:
            rank: The rank.
            world_size: Ranks in the build.

        Returns:
            The shard, writable.

        Raises:
            UserError: When a shard of a build with another world size is in the folder, or
                the shard was written by other weights or settings.
        """
        if self.store is not None:
            return self.store
        for path in self.folder.glob("store-rank*.h5"):
            match = SHARD_FILE.search(path.name)
            if match and int(match.group(1)) >= world_size:
                raise UserError(
                    f"{path} was written by a build with more ranks than {world_size}: resume "
                    "with the same number of devices, or pass --overwrite to start again"
                )
        path = self.folder / shard_name(rank)
        info = self.info.with_extra(rank=rank, world_size=world_size)
        if path.exists():
            existing = HDF5Store(path, mode="r", allow_incomplete=True)
            stored = existing.info
            existing.close()
            if stored.extra.get("world_size") != world_size:
                raise UserError(
                    f"{path} was written by a build on {stored.extra.get('world_size')} ranks, "
                    f"this one has {world_size}: resume with the same number of devices, or "
                    "pass --overwrite to start again"
                )
            knowledge = info.extra.get("knowledge")
            if stored.extra.get("knowledge", knowledge) != knowledge:  # (older shards: unknown)
                raise UserError(
                    f"{path} holds memories of another knowledge base: its texts changed since "
                    "the build was interrupted; pass --overwrite to start again"
                )
            if stored.tokenizer_fingerprint != info.tokenizer_fingerprint:
                raise UserError(
                    f"{path} holds references of another tokenizer "
                    f"({stored.tokenizer_fingerprint[:16]}, now {info.tokenizer_fingerprint[:16]})"
                    ": pass --overwrite to start again"
                )
            if stored.model_fingerprint != info.model_fingerprint:
                raise UserError(
                    f"{path} holds memories of other weights ({stored.model_fingerprint[:16]}, "
                    f"now {info.model_fingerprint[:16]}): pass --overwrite to rebuild"
                )
            had = (stored.quantizer or {}).get("fingerprint")
            now = None if self.quantizer is None else self.quantizer.fingerprint()
            if not (had is None if self.quantizer is None else self.quantizer.matches(had)):
                raise UserError(
                    f"{path} holds memories of another quantizer ({str(had)[:16]}, now "
                    f"{str(now)[:16]}): pass --overwrite to rebuild"
                )
        self.store = HDF5Store(path, info=info, mode="a", quantizer=self.quantizer)
        return self.store

    def rank_and_size(self, trainer: L.Trainer) -> tuple[int, int]:
        """The rank this writer writes for and the number of ranks of the build.

        Args:
            trainer: The predict run's trainer; its `global_rank` and `world_size` are used
                unless the writer was given `shard`.

        Returns:
            `(rank, world_size)`.
        """
        return self.shard if self.shard is not None else (trainer.global_rank, trainer.world_size)

    def pending(self, trainer: L.Trainer) -> np.ndarray:
        """The ids of this rank's references that its shard does not hold yet.

        Opens (or creates) the shard. A rank owns the references `id % world_size == rank`.

        Args:
            trainer: The predict run's trainer (gives the rank, see `rank_and_size`).

        Returns:
            The ids still to encode, `(n,)` int64 ascending; empty when the shard is full.
        """
        rank, world = self.rank_and_size(trainer)
        store = self.open(rank, world)
        ids = np.arange(rank, len(self.references), world)
        return ids[~np.isin(ids, store.ids().numpy())]

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
        """Write one batch's memories and provenance to the shard (a Lightning hook).

        Args:
            trainer: The predict run's trainer (gives the rank, see `rank_and_size`).
            pl_module: The `BankEncoder` that made the prediction (unused).
            prediction: What `BankEncoder.predict_step` returned: `ids` `(N,)` and `memory`,
                a `SparseMemory` with keys and values `(N, L_mem, H_kv, k, d_h)`.
            batch_indices: Lightning's sample indices of the batch (unused: the ids travel
                in the prediction).
            batch: The batch that was encoded (unused).
            batch_idx: The batch's position in the run (unused).
            dataloader_idx: The dataloader's position (unused; there is one).
        """
        store = self.open(*self.rank_and_size(trainer))
        ids = prediction["ids"]
        store.write(ids, prediction["memory"], [self.references[i] for i in ids.tolist()])
        self.written += len(ids)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Mark the shard complete once every reference of the rank is in it (a Lightning hook).

        Args:
            trainer: The predict run's trainer (gives the rank, see `rank_and_size`).
            pl_module: The `BankEncoder` (unused).
        """
        self.finish_shard(trainer)

    def finish_shard(self, trainer: L.Trainer) -> None:
        """Mark the shard complete if it holds every reference of its rank, then close it.

        Also called after the predict run, so that a shard that was already full (nothing left
        to encode, no predict loop) is marked complete too.

        Args:
            trainer: The predict run's trainer (gives the rank, see `rank_and_size`).
        """
        rank, world = self.rank_and_size(trainer)
        store = self.open(rank, world)
        expected = len(range(rank, len(self.references), world))
        if len(store) == expected:
            store.mark_complete()
        store.close()
        self.store = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Close the shard, unmarked, so that the next run resumes it (a Lightning hook).

        Args:
            trainer: The predict run's trainer (unused).
            pl_module: The `BankEncoder` (unused).
            exception: What interrupted the run; Lightning re-raises it.
        """
        if self.store is not None:
            self.store.close()
            self.store = None


class PendingReferences(L.LightningDataModule):
    """The references a rank's shard still lacks, in length-sorted batches.

    Asked at predict time, so a resumed build encodes only what is missing.

    Args:
        writer: The writer that knows each rank's shard.
        batch_size: References per batch.
    """

    def __init__(self, writer: BankWriter, *, batch_size: int) -> None:
        super().__init__()
        self.writer, self.batch_size = writer, batch_size

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """One item per batch of this rank's pending references."""
        pending = self.writer.pending(self.trainer)
        dataset = ReferenceBatches(self.writer.references, pending, batch_size=self.batch_size)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False)
