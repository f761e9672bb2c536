"""`m3 build-memory`: encode a knowledge base into a memory bank (paper §3.3, warm start).

The knowledge base (`data.knowledge` sources) is tokenized and cut into references; a
reference's id is its position in that list, the same ids the continual stage uses, so a
retriever maps ids back to token ids. The weights named by `training.init_weights` encode
every reference through Lightning's `Trainer.predict`, in length-sorted batches;
`BankWriter`, a prediction writer, appends each batch to its rank's HDF5 shard. Then every
reference's text is embedded with the recipe's embedder (fitted on the references first) and
an index is built. The bank folder holds:

| file | what |
|---|---|
| `store-rank{r}.h5` | the memories of the references `id % world_size == r` (`HDF5Store`) |
| `quantizer.pt` | the trained `MemoryQuantizer` of a quantized bank (`bank.quantizer`) |
| `embedder/` | the fitted embedder (its `save`, for embedders that have one) |
| `index/` | the search index over every reference (`bank.index`, default `ExactIndex`) |
| `manifest.json` | shards, counts, fingerprints, dtype, quantizer, embedder and index |
| `recipe.yaml`, `fingerprint`, `done.json` | the run folder (`done.json` written last) |

`open_bank(folder)` opens the shards as one store (`ShardedStore`, read-only) with the index
and the embedder. An interrupted build resumes: each shard is reopened in append mode and only
the references it lacks are encoded; a shard is marked complete after its last write.

The recipe's `bank:` section sets the stored dtype, the batch size, the index and the vector
quantizer. A quantized bank's shards keep codes and decode on read (`HDF5Store(quantizer=)`):
the quantizer is trained before encoding starts, on the memories of `bank.train_references`
references sampled uniformly with the recipe's seed (paper §3.3), or read from
`bank.quantizer_file`; it is saved as `quantizer.pt` first, so that a resumed build and every
rank (Lightning's launcher starts the other ranks after it is saved) use the same one.

Cold start (memories encoded when first retrieved, then kept) is `ColdStartStore`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn

from m3.backends.base import MemoryIndex, MemoryStore, StoreInfo
from m3.backends.hdf5_store import HDF5Store
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Chunker, FixedChunker, Reference, chunk_documents
from m3.data.sources import FilesSource, TextSource
from m3.memory.encoder import MemoryEncoder, encode_references
from m3.model.memory3 import Memory3

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.memory.quantize import MemoryQuantizer
    from m3.recipes import Recipe
    from m3.retrieval.embedders import Embedder

MANIFEST = "manifest.json"
#: The journal of an edit in progress (`m3.bank.edit`): the bank is unfinished while it exists.
EDIT_JOURNAL = "edit-journal"
#: The trained quantizer of a quantized bank, in the bank folder.
QUANTIZER = "quantizer.pt"
#: Knowledge bases with more references than this get a `ScannIndex`, smaller ones an exact one.
SCANN_ABOVE = 200_000
_SHARD = re.compile(r"store-rank(\d+)\.h5$")


def shard_name(rank: int) -> str:
    """The file name of a rank's shard in a bank folder.

    Args:
        rank: The rank that writes the shard (0-based).

    Returns:
        `store-rank{rank}.h5`, e.g. `store-rank0.h5`.
    """
    return f"store-rank{rank}.h5"


# ------------------------------------------------------------------------------ knowledge base
@dataclass
class KnowledgeBase:
    """The references of a knowledge base and what reading it found.

    Attributes:
        references: The references; a reference's id is its position in this list.
        documents: Documents that gave at least one reference.
        skipped: Documents left out: empty, whitespace-only or tokenizing to nothing.
    """

    references: list[Reference]
    documents: int
    skipped: int


def read_knowledge(
    sources: Sequence[TextSource], tokenizer: Tokenizer, *, chunker: Chunker
) -> KnowledgeBase:
    """Tokenize the knowledge base's documents and cut them into references.

    This is the one definition of reference ids, shared by the continual stage's pairing
    (`m3.training.datamodule.TextDataModule.build_references`) and the bank: documents of the
    sources in order, each cut by the chunker.

    Args:
        sources: The knowledge base's sources (`data.knowledge`).
        tokenizer: Tokenizes the documents.
        chunker: Cuts each document into references of at most `max_tokens` tokens.

    Returns:
        The references and the counts of documents read and skipped.

    Raises:
        UserError: When the sources hold no text at all (naming them), or for files with
            undecodable bytes (naming the file).
    """
    from m3.data.documents import read_corpus

    names = "; ".join(s.describe() for s in sources) or "(no sources)"
    docs: list[tuple[str, list[int]]] = []
    skipped = 0
    for source in sources:
        if isinstance(source, FilesSource):
            try:
                corpus = read_corpus(source.paths, text_field=source.text_field)
            except UserError as error:
                if not str(error).startswith("no text in"):
                    raise
                raise UserError(f"data.knowledge: the knowledge base is empty: {error}") from None
            documents, skipped = corpus.documents, skipped + corpus.skipped
        else:
            documents = source.documents()
        for document in documents:
            ids = tokenizer.encode(document.text) if document.text.strip() else []
            if ids:
                docs.append((document.id, ids))
            else:
                skipped += 1
    if not docs:
        raise UserError(
            f"data.knowledge: the knowledge base is empty: no document with text in {names} "
            f"({skipped} empty documents skipped)"
        )
    return KnowledgeBase(chunk_documents(docs, chunker), len(docs), skipped)


# ------------------------------------------------------------------------------ Lightning parts
class ReferenceBatches(torch.utils.data.Dataset):
    """Length-sorted batches of references, one dataset item per batch.

    Args:
        references: Every reference of the knowledge base (id = position).
        ids: The ids to encode.
        batch_size: References per batch.
    """

    def __init__(self, references: Sequence[Reference], ids: Sequence[int], *, batch_size: int):
        self.references = references
        order = sorted(ids, key=lambda i: (len(references[i].ids), i))
        self.batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """One batch: `ids` `(N,)`, right-padded `tokens` `(N, T)` and `lengths` `(N,)`."""
        ids = self.batches[index]
        lengths = torch.tensor([len(self.references[i].ids) for i in ids])
        tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(ids):
            tokens[row, : lengths[row]] = torch.tensor(self.references[i].ids)
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
        from m3.memory.sparsifier import TopKSparsifier

        self.model = model.eval().requires_grad_(False)
        self.encoder = encoder or MemoryEncoder()
        self.sparsifier = sparsifier or TopKSparsifier(k=model.config.memory_tokens)
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
            match = _SHARD.search(path.name)
            if match and int(match.group(1)) >= world_size:
                raise UserError(
                    f"{path} was written by a build with more ranks than {world_size}: resume "
                    "with the same number of devices, or pass --overwrite to start again"
                )
        path = self.folder / shard_name(rank)
        info = _with_extra(self.info, rank=rank, world_size=world_size)
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
            if stored.model_fingerprint != info.model_fingerprint:
                raise UserError(
                    f"{path} holds memories of other weights ({stored.model_fingerprint[:16]}, "
                    f"now {info.model_fingerprint[:16]}): pass --overwrite to rebuild"
                )
            had = (stored.quantizer or {}).get("fingerprint")
            now = None if self.quantizer is None else self.quantizer.fingerprint()
            if had != now:
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

    def pending(self, trainer: L.Trainer) -> list[int]:
        """The ids of this rank's references that its shard does not hold yet.

        Opens (or creates) the shard. A rank owns the references `id % world_size == rank`.

        Args:
            trainer: The predict run's trainer (gives the rank, see `rank_and_size`).

        Returns:
            The ids still to encode, ascending; empty when the shard is full.
        """
        rank, world = self.rank_and_size(trainer)
        store = self.open(rank, world)
        ids = np.arange(rank, len(self.references), world)
        return ids[~np.isin(ids, store.ids().numpy())].tolist()

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


class _BankData(L.LightningDataModule):
    def __init__(self, writer: BankWriter, *, batch_size: int) -> None:
        super().__init__()
        self.writer, self.batch_size = writer, batch_size

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        pending = self.writer.pending(self.trainer)
        dataset = ReferenceBatches(self.writer.references, pending, batch_size=self.batch_size)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False)


def _with_extra(info: StoreInfo, **extra: Any) -> StoreInfo:
    fields = json.loads(info.to_json())
    fields["extra"] = {**fields["extra"], **extra}
    fields["memory_shape"] = tuple(fields["memory_shape"])
    fields["reference_prefix"] = tuple(fields["reference_prefix"])
    return StoreInfo(**fields)


# ------------------------------------------------------------------------------ opening a bank
class ShardedStore(MemoryStore):
    """Several shards read as one store (read-only), routing each id to its shard.

    Args:
        shards: The shards; each id must be in one of them only.

    Raises:
        UserError: For shards of different memory shapes, dtypes, weights or quantizers, or an
            id held by two shards.
    """

    def __init__(self, shards: Sequence[MemoryStore]) -> None:
        if not shards:
            raise UserError("a sharded store needs at least one shard")
        first = shards[0].info
        for shard in shards[1:]:
            if (shard.info.memory_shape, shard.info.dtype, shard.info.model_fingerprint,
                (shard.info.quantizer or {}).get("fingerprint")) != (
                first.memory_shape, first.dtype, first.model_fingerprint,
                (first.quantizer or {}).get("fingerprint"),
            ):  # fmt: skip
                raise UserError(f"{shard} holds other memories than {shards[0]}")
        self.shards = list(shards)
        self.info = _with_extra(first, rank=None)
        ids = [s.ids().numpy() for s in self.shards]
        owner = np.concatenate([np.full(len(a), i) for i, a in enumerate(ids)])
        flat = np.concatenate(ids)
        order = np.argsort(flat, kind="stable")
        self._ids, self._owner = flat[order], owner[order]
        if len(self._ids) > 1 and (repeat := self._ids[1:] == self._ids[:-1]).any():
            raise UserError(f"reference {int(self._ids[1:][repeat][0])} is in two shards")

    def _route(self, ids: Sequence[int] | Tensor) -> tuple[np.ndarray, np.ndarray]:
        from m3.backends.base import MissingReferenceError

        array = np.asarray(torch.as_tensor(ids, dtype=torch.long).reshape(-1).numpy())
        where = np.searchsorted(self._ids, array).clip(max=max(len(self._ids) - 1, 0))
        if len(self._ids) == 0 or (self._ids[where] != array).any():
            missing = array if len(self._ids) == 0 else array[self._ids[where] != array]
            raise MissingReferenceError(f"reference {int(missing[0])} is not in the bank")
        return array, self._owner[where]

    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories from their shards (see `MemoryStore.read`): `(N, L_mem, H_kv, k, d_h)`."""
        array, owner = self._route(ids)
        if len(array) == 0:
            return self.shards[0].read([])
        parts, positions = [], []
        for shard in np.unique(owner).tolist():
            rows = np.flatnonzero(owner == shard)
            parts.append(self.shards[shard].read(torch.from_numpy(array[rows])).to("cpu"))
            positions.append(rows)
        memory = SparseMemory.cat([SparseMemory(p.keys.clone(), p.values.clone(), p.valid,
                                                p.positions) for p in parts])  # fmt: skip
        inverse = np.empty(len(array), dtype=np.int64)
        inverse[np.concatenate(positions)] = np.arange(len(array))
        return memory[torch.from_numpy(inverse)]

    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references, in order."""
        array, owner = self._route(ids)
        return [
            self.shards[o].references([i])[0]
            for i, o in zip(array.tolist(), owner.tolist(), strict=True)
        ]

    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Refused: a bank opened with `open_bank` is read-only."""
        raise UserError("a sharded bank is read-only: rebuild it with m3 build-memory")

    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Refused: a bank opened with `open_bank` is read-only."""
        raise UserError("a sharded bank is read-only: rebuild it with m3 build-memory")

    def ids(self) -> Tensor:
        """All reference ids of every shard, `(N,)` int64, ascending."""
        return torch.from_numpy(self._ids.copy())

    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check stored bytes in every shard; the damaged ids, ascending."""
        if ids is None:
            return sorted(i for s in self.shards for i in s.verify())
        array, owner = self._route(ids)
        return sorted(
            i
            for o in np.unique(owner).tolist()
            for i in self.shards[o].verify(torch.from_numpy(array[owner == o]))
        )

    def __len__(self) -> int:
        return len(self._ids)

    def close(self) -> None:
        """Close every shard."""
        for shard in self.shards:
            shard.close()


class Bank(NamedTuple):
    """An opened memory bank.

    Attributes:
        store: The memories (one `HDF5Store`, or a `ShardedStore` over several).
        index: The search index over every reference's embedding.
        embedder: The embedder that built the index (embed queries with it).
        manifest: The bank's `manifest.json`.
    """

    store: MemoryStore
    index: MemoryIndex
    embedder: Embedder
    manifest: dict[str, Any]


def _class(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def open_bank_store(folder: str | Path) -> tuple[MemoryStore, dict[str, Any]]:
    """Open only the store of a bank that `build_memory` wrote, with its manifest.

    Its shards open read-only as one store; neither the index nor the embedder is loaded
    (continual training in `training.encode: store` reads memories by id, searching
    nothing).

    Args:
        folder: The bank folder.

    Returns:
        The store and the bank's `manifest.json`.

    Raises:
        UserError: For a folder without a finished bank, an incomplete shard, or a shard
            whose quantizer is not the manifest's.
    """
    folder = Path(folder)
    if (folder / EDIT_JOURNAL).is_dir():
        raise UserError(
            f"{folder} holds no finished memory bank: an edit was interrupted; finish it with "
            f"m3 edit {folder} --resume"
        )
    if not (folder / MANIFEST).is_file() or not (folder / "done.json").is_file():
        raise UserError(f"{folder} holds no finished memory bank (run m3 build-memory)")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = [folder / shard["file"] for shard in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder / MANIFEST} is not a bank manifest ({error!r})") from None
    shards = [HDF5Store(path) for path in files]
    recorded = (manifest.get("quantizer") or {}).get("fingerprint")
    for shard in shards:
        if (shard.info.quantizer or {}).get("fingerprint") != recorded:
            raise UserError(
                f"{shard.path}: its quantizer is not the one in {folder / MANIFEST} "
                f"({str(recorded)[:16]}): rebuild the bank"
            )
    store: MemoryStore = shards[0] if len(shards) == 1 else ShardedStore(shards)
    return store, manifest


def open_bank(folder: str | Path) -> Bank:
    """Open a bank that `build_memory` wrote: its shards as one store, its index and embedder.

    Args:
        folder: The bank folder.

    Returns:
        The bank.

    A quantized bank's shards reopen with the quantizer each holds (checked against the
    manifest's); reads decode to the manifest's `dtype`.

    Raises:
        UserError: For a folder without a finished bank, an incomplete shard, or a shard
            whose quantizer is not the manifest's.
    """
    folder = Path(folder)
    store, manifest = open_bank_store(folder)
    index = _class(manifest["index"]["class"]).load(folder / "index")
    embedder_class = _class(manifest["embedder"]["class"])
    if (folder / "embedder").is_dir() and hasattr(embedder_class, "load"):
        embedder = embedder_class.load(folder / "embedder")
    else:
        from m3.core import registry

        embedder = registry.instantiate("embedder", manifest["embedder"]["spec"])
    if embedder.fingerprint() != manifest["embedder"]["fingerprint"]:
        raise UserError(f"{folder}: the saved embedder differs from the one that built the index")
    return Bank(store, index, embedder, manifest)


# ------------------------------------------------------------------------------ cold start
class ColdStartStore(MemoryStore):
    """A store filled lazily: a reference is encoded the first time it is read, then kept.

    The cold start of paper §3.3. Reads of stored references are served by the store; the
    others are encoded by the model (length-sorted batches, no gradient), written to the
    store, then returned with the rest.

    Args:
        store: A writable store (e.g. `HDF5Store(path, info=..., mode="a")`).
        model: The model whose memory layers encode; its fingerprint must be the store's.
        references: Every reference of the knowledge base (id = position).
        prefix: Ids of the `<s>Reference:` prefix.
        encoder: The encoder; `MemoryEncoder()` when None.
        sparsifier: The sparsifier; `TopKSparsifier(k=memory_tokens)` when None.
        batch_size: References per forward pass.

    Attributes:
        encoded: References encoded by this object so far.
    """

    def __init__(
        self,
        store: MemoryStore,
        model: Memory3,
        references: Sequence[Reference],
        *,
        prefix: Sequence[int],
        encoder: MemoryEncoder | None = None,
        sparsifier: nn.Module | None = None,
        batch_size: int = 64,
    ) -> None:
        store.info.check_model(
            model.config.memory_shape, model.memory_fingerprint(), where=repr(store)
        )
        self.store, self.model, self.all_references = store, model, references
        self.info = store.info
        self.prefix = list(prefix)
        self.encoder, self.sparsifier, self.batch_size = encoder, sparsifier, batch_size
        self.encoded = 0

    def _fill(self, ids: Sequence[int] | Tensor) -> None:
        wanted = np.unique(torch.as_tensor(ids, dtype=torch.long).reshape(-1).numpy())
        missing = wanted[~np.isin(wanted, self.store.ids().numpy())].tolist()
        bad = [i for i in missing if not 0 <= i < len(self.all_references)]
        if bad:
            raise UserError(f"reference {bad[0]} is not in the knowledge base")
        if not missing:
            return
        chosen = [self.all_references[i] for i in missing]
        with torch.no_grad():
            memory = encode_references(
                self.model, [r.ids for r in chosen], prefix=self.prefix, encoder=self.encoder,
                sparsifier=self.sparsifier, batch_size=self.batch_size,
            )  # fmt: skip
        self.store.write(torch.tensor(missing), memory.to("cpu"), chosen)
        self.encoded += len(missing)

    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories, encoding and storing those not stored yet: `(N, L_mem, H_kv, k, d_h)`."""
        self._fill(ids)
        return self.store.read(ids)

    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references (stored or not), in order."""
        return [self.all_references[int(i)] for i in torch.as_tensor(ids).reshape(-1).tolist()]

    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Write to the underlying store (see `MemoryStore.write`)."""
        self.store.write(ids, memory, references)

    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Delete from the underlying store; a later read encodes them again."""
        self.store.delete(ids)

    def ids(self) -> Tensor:
        """The ids stored so far, `(N,)` int64, ascending."""
        return self.store.ids()

    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check the underlying store's bytes; the damaged ids."""
        return self.store.verify(ids)

    def close(self) -> None:
        """Close the underlying store."""
        self.store.close()


# ------------------------------------------------------------------------------ the stage
def _folder_bytes(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def build_index(
    references: Sequence[Reference],
    tokenizer: Tokenizer,
    embedder: Embedder,
    *,
    batch_size: int = 1024,
    progress: bool = True,
    index: Any = None,
) -> MemoryIndex:
    """Fit the embedder on the references' texts, embed them and build an index.

    Args:
        references: Every reference (id = position).
        tokenizer: Decodes each reference's token ids to its text.
        embedder: Fitted here on the texts, then embeds them.
        batch_size: Texts embedded at a time.
        progress: Show tqdm progress bars.
        index: The index's component spec (kind `index`, `dim` set to the embedder's), e.g.
            a recipe's `bank.index`; None for the default.

    Returns:
        The index, built: by default an `ExactIndex` (or a `ScannIndex` above
        `SCANN_ABOVE` references).
    """
    from tqdm.auto import tqdm

    from m3.backends import ExactIndex, ScannIndex
    from m3.core import registry

    texts = [tokenizer.decode(r.ids) for r in references]
    embedder.fit(texts)
    spec = index
    index = (
        registry.instantiate("index", spec, dim=embedder.dim)
        if spec is not None
        else ScannIndex(embedder.dim)
        if len(texts) > SCANN_ABOVE
        else ExactIndex(embedder.dim)
    )
    for start in tqdm(
        range(0, len(texts), batch_size), desc="embedding references", disable=not progress
    ):
        part = texts[start : start + batch_size]
        ids = torch.arange(start, start + len(part), dtype=torch.long)
        index.add(embedder.embed(part), ids)
    index.build()
    return index


def build_memory(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    batch_size: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    shard: tuple[int, int] | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Build the memory bank a recipe describes (`stage: build_memory`).

    Args:
        recipe: A checked recipe with `data.knowledge`, a tokenizer and
            `training.init_weights`.
        overwrite: Replace a bank folder that another recipe wrote.
        batch_size: References per forward pass; the recipe's `bank.batch_size` (64) when
            None.
        dtype: The dtype the shards store keys and values in (decode them to, when
            quantized); the recipe's `bank.dtype` (float32) when None.
        shard: `(rank, world_size)`: write only this shard (ranks launched by hand, without
            a distributed strategy). The index is built by whichever run finds every shard
            complete.
        callbacks: More Lightning callbacks for the predict run.

    Returns:
        The bank folder.

    Raises:
        UserError: For a recipe that cannot build (no knowledge base, tokenizer or weights;
            an empty knowledge base; a folder of another recipe; a quantizer that cannot be
            trained on the sampled memories).
    """
    if recipe.stage != "build_memory":
        raise UserError(f"stage: m3 build-memory runs 'build_memory' stages, got {recipe.stage!r}")
    if recipe.data is None or not recipe.data.knowledge:
        raise UserError("data.knowledge: name the knowledge base's sources")
    if recipe.tokenizer is None:
        raise UserError("tokenizer: building a memory bank needs the tokenizer")
    init = recipe.training.init_weights
    if init is None:
        raise UserError(
            "training.init_weights: name the weights that write the memories (a stage's "
            "model.pt, a .ckpt or a Hugging Face folder)"
        )
    if not Path(init).exists():
        raise UserError(f"training.init_weights: {init} does not exist (train the model first?)")
    from m3.core import registry
    from m3.core.runs import RunFolder
    from m3.recipes import BankSection, build, build_tokenizer
    from m3.training.module import Memory3Module

    settings = recipe.bank or BankSection()
    batch_size = settings.batch_size if batch_size is None else batch_size
    dtype = settings.dtype if dtype is None else dtype
    config = recipe.model.config()
    tokenizer = build_tokenizer(recipe)
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        print(f"m3 build-memory: {run.path} is complete for this recipe; nothing to do")
        return run.path
    if (run.path / EDIT_JOURNAL).is_dir():
        raise UserError(
            f"{run.path} has an interrupted edit: finish it with m3 edit {run.path} --resume"
        )
    module = Memory3Module(config, init_weights=init)
    model = module.model
    chunker = build(recipe, "chunker") if recipe.chunker else FixedChunker(config.reference_length)
    encoder = build(recipe, "encoder") if recipe.encoder else None
    sparsifier = build(recipe, "sparsifier") if recipe.sparsifier else None
    embedder = build(recipe, "embedder") if recipe.embedder else None
    if embedder is None:
        from m3.retrieval.embedders import HashedNgramEmbedder

        embedder = HashedNgramEmbedder()
    sources = [registry.instantiate("source", s) for s in recipe.data.knowledge]
    knowledge = read_knowledge(sources, tokenizer, chunker=chunker)
    prefix = tokenizer.reference_prefix()
    info = StoreInfo(
        memory_shape=config.memory_shape,
        dtype=dtype,
        model_config=config.to_dict(),
        model_fingerprint=model.memory_fingerprint(),
        tokenizer_fingerprint=tokenizer.fingerprint(),
        reference_prefix=tuple(prefix),
        extra={"references": len(knowledge.references)},
    )
    run.claim(overwrite=overwrite)  # everything above is checked: now the folder is ours
    quantizer = bank_quantizer(
        recipe, run.path, model, knowledge.references, prefix=prefix, encoder=encoder,
        sparsifier=sparsifier, batch_size=batch_size,
    )  # fmt: skip

    writer = BankWriter(run.path, info, knowledge.references, shard=shard, quantizer=quantizer)
    options = recipe.trainer.to_kwargs()
    keep = ("accelerator", "devices", "num_nodes", "strategy", "precision",
            "enable_progress_bar", "deterministic")  # fmt: skip
    trainer = L.Trainer(
        **{k: v for k, v in options.items() if k in keep},
        default_root_dir=run.path,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        callbacks=[writer, *callbacks],
    )
    encoding = BankEncoder(model, prefix, encoder=encoder, sparsifier=sparsifier)
    start = _now()
    with warnings.catch_warnings():
        # the writer gets each batch's reference ids in the prediction itself
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        trainer.predict(
            encoding, datamodule=_BankData(writer, batch_size=batch_size), return_predictions=False
        )
    seconds = _now() - start
    writer.finish_shard(trainer)  # also when nothing was left to encode (no predict loop ran)
    if trainer.world_size > 1:
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return run.path
    world = shard[1] if shard is not None else trainer.world_size
    return _finish(
        run,
        knowledge,
        world=world,
        tokenizer=tokenizer,
        embedder=embedder,
        embedder_spec=recipe.to_dict().get("embedder"),
        index_spec=settings.index,
        quantizer=quantizer,
        written=writer.written,
        seconds=seconds,
        progress=recipe.trainer.enable_progress_bar,
    )


def bank_quantizer(
    recipe: Recipe,
    folder: Path,
    model: Memory3,
    references: Sequence[Reference],
    *,
    prefix: Sequence[int],
    encoder: MemoryEncoder | None = None,
    sparsifier: nn.Module | None = None,
    batch_size: int = 64,
) -> MemoryQuantizer | None:
    """The trained quantizer of a bank build, saved in the bank folder first.

    In order: the folder's `quantizer.pt` (a resumed build, or the rank that trained it);
    the recipe's `bank.quantizer_file`; or `bank.quantizer` trained on the memories of
    `bank.train_references` references drawn uniformly with the recipe's seed (encoded on a
    GPU when one is available and the trainer may use it). Keys and values get separately
    trained quantizers.

    Args:
        recipe: The build's recipe.
        folder: The bank folder (claimed by this build).
        model: The model whose memory layers encode.
        references: Every reference of the knowledge base (id = position).
        prefix: Ids of the `<s>Reference:` prefix.
        encoder: The encoder; `MemoryEncoder()` when None.
        sparsifier: The sparsifier; `TopKSparsifier(k=memory_tokens)` when None.
        batch_size: References per forward pass while sampling.

    Returns:
        The quantizer on the CPU, or None for a bank of raw memories.

    Raises:
        UserError: When the sampled memories are too few to train the quantizer (naming
            `bank.train_references`), or a saved quantizer does not fit the model.
    """
    from m3.memory.quantize import MemoryQuantizer
    from m3.recipes import bank_quantizer as recipe_quantizer

    saved = folder / QUANTIZER
    settings = recipe.bank
    if settings is None or (settings.quantizer is None and settings.quantizer_file is None):
        return None
    head_dim = model.config.head_dim
    if saved.is_file() or settings.quantizer_file is not None:
        path = saved if saved.is_file() else Path(str(settings.quantizer_file))
        quantizer = MemoryQuantizer.load(path)
        if quantizer.keys.dim != head_dim:
            raise UserError(
                f"bank.quantizer_file: {path} codes {quantizer.keys.dim}-dim vectors, the "
                f"model's head_dim is {head_dim}"
            )
        if not quantizer.fitted:
            raise UserError(f"bank.quantizer_file: {path} holds an untrained quantizer")
    else:
        quantizer = MemoryQuantizer(recipe_quantizer(recipe))
        generator = torch.Generator().manual_seed(recipe.seed)
        count = min(settings.train_references, len(references))
        ids = torch.randperm(len(references), generator=generator)[:count].sort().values
        use_gpu = torch.cuda.is_available() and recipe.trainer.accelerator in (
            "auto",
            "gpu",
            "cuda",
        )
        device = torch.device("cuda" if use_gpu else "cpu")
        model.to(device)
        with torch.no_grad():
            sample = encode_references(
                model, [references[i].ids for i in ids.tolist()], prefix=prefix,
                encoder=encoder, sparsifier=sparsifier, batch_size=batch_size,
            )  # fmt: skip
        model.to("cpu")
        try:
            quantizer.fit(sample, seed=recipe.seed)
        except UserError as error:
            raise UserError(
                f"bank.quantizer: cannot train it on the memories of {count} sampled "
                f"references ({error}); raise bank.train_references or lower its bits"
            ) from None
        quantizer.keys.to("cpu")
        quantizer.values.to("cpu")
    if not saved.is_file():
        partial = saved.with_suffix(".partial")
        quantizer.save(partial)
        partial.replace(saved)  # a file that exists is whole
    return quantizer


def _now() -> float:
    import time

    return time.perf_counter()


def _finish(
    run: Any,
    knowledge: KnowledgeBase,
    *,
    world: int,
    tokenizer: Tokenizer,
    embedder: Embedder,
    embedder_spec: Any,
    index_spec: Any = None,
    quantizer: MemoryQuantizer | None = None,
    written: int,
    seconds: float,
    progress: bool,
) -> Path:
    """Index the bank and write its manifest and `done.json` once every shard is complete."""
    folder: Path = run.path
    shards = []
    for rank in range(world):
        path = folder / shard_name(rank)
        if not path.exists():
            print(f"m3 build-memory: shard {rank} of {world} is not written yet")
            return folder
        store = HDF5Store(path, mode="r", allow_incomplete=True)
        complete, count, info = store.complete, len(store), store.info
        store.close()
        if not complete:
            print(f"m3 build-memory: shard {rank} of {world} is not complete yet")
            return folder
        shards.append({"file": path.name, "references": count})
    index = build_index(
        knowledge.references, tokenizer, embedder, progress=progress, index=index_spec
    )
    index.save(folder / "index")
    if hasattr(embedder, "save"):
        embedder.save(folder / "embedder")
    manifest = {
        "format": "m3.bank",
        "format_version": 1,
        "references": len(knowledge.references),
        "world_size": world,
        "shards": shards,
        "model_fingerprint": info.model_fingerprint,
        "tokenizer_fingerprint": info.tokenizer_fingerprint,
        "reference_prefix": list(info.reference_prefix),
        "memory_shape": list(info.memory_shape),
        "dtype": info.dtype,
        "quantizer": None
        if quantizer is None
        else {"file": QUANTIZER, **quantizer.store_description()},
        "embedder": {
            "class": f"{type(embedder).__module__}.{type(embedder).__qualname__}",
            "fingerprint": embedder.fingerprint(),
            "spec": embedder_spec,
        },
        "index": {"class": f"{type(index).__module__}.{type(index).__qualname__}"},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    outputs = [folder / s["file"] for s in shards]
    outputs += [folder / "index", folder / "embedder", folder / QUANTIZER]
    summary = {
        "stage": "build_memory",
        "documents": knowledge.documents,
        "references": len(knowledge.references),
        "skipped": knowledge.skipped,
        "encoded_this_run": written,
        "bytes_written": _folder_bytes(outputs),
        "store_bytes": _folder_bytes(outputs[: len(shards)]),
        "references_per_second": round(written / seconds, 1) if seconds > 0 and written else None,
    }
    run.finish(summary)
    print(
        f"m3 build-memory: bank in {folder}: {summary['documents']} documents, "
        f"{summary['references']} references ({written} encoded in this run), "
        f"{summary['skipped']} documents skipped, {summary['bytes_written']:,} bytes written "
        f"({summary['store_bytes']:,} in the store)",
        flush=True,
    )
    return folder


__all__ = [
    "Bank",
    "BankEncoder",
    "BankWriter",
    "ColdStartStore",
    "KnowledgeBase",
    "ReferenceBatches",
    "ShardedStore",
    "bank_quantizer",
    "build_index",
    "build_memory",
    "open_bank",
    "read_knowledge",
    "shard_name",
]
