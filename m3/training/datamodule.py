"""Training data: local text -> packed sequences, paired with references for the continual stage.

- `pack` turns tokenized documents into sequences of `length + 1` tokens that each start
  with the BOS (token 0 of chunk 0, as memory mode counts chunks).
- `pair_references` (`m3.training.pairing`) precomputes, for every 64-token chunk of every
  sequence, the one reference it retrieves (paper §3.5, §5): the chunk's text is embedded and
  searched; a candidate whose overlap with the training sequence exceeds 0.9 (Eq. 6) is
  skipped for the next hit. The references are read by id from a reference table (the
  bank's, or one written next to the pairing file: `m3.training.pairing`).
- `ContinualCollator` (`m3.training.collate`) builds a batch's memory pool: the batch's
  distinct references (each encoded once, on the fly, by the LightningModule, or read from a
  memory bank's store: `training.encode: store`), each row's pool and each chunk's slot.
- `TextDataModule` ties them together, with a held-out split, DataLoader workers, and a
  data position that checkpoints save and restore; `read_data` checks the text first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from m3.backends.base import MemoryStore
from m3.core import registry
from m3.core.errors import UserError
from m3.core.values import Bounds
from m3.data.chunking import Chunker, Reference
from m3.data.sources import TextSource, gather
from m3.data.tokenizer import Tokenizer
from m3.recipes.defaults import default_spec
from m3.retrieval.embedders import Embedder
from m3.training.collate import ContinualCollator, open_memory_store
from m3.training.pairing import (
    fingerprint,
    pair_references,
    pairing_fingerprint,
    pairing_table,
    reference_table_for,
    reference_tokens,
)

__all__ = [
    "ContinualCollator",
    "EpochSampler",
    "SequenceDataset",
    "TextDataModule",
    "fingerprint",
    "open_memory_store",
    "pack",
    "pair_references",
]

if TYPE_CHECKING:
    from m3.model.memory3 import Memory3


def pack(documents: Iterable[Sequence[int]], *, length: int, bos_id: int, eos_id: int) -> Tensor:
    """Pack tokenized documents into training sequences.

    Documents are joined into one stream, each followed by the EOS; the stream is cut into
    consecutive windows of `length` tokens, and each sequence is the BOS followed by one
    window (inputs `seq[:-1]` start with the BOS, targets are `seq[1:]`). The last partial
    window is dropped.

    Args:
        documents: Token ids of each document.
        length: Tokens per sequence after the BOS.
        bos_id: BOS id.
        eos_id: EOS id.

    Returns:
        `(N, length + 1)` long.
    """
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        stream.append(eos_id)
    count = len(stream) // length
    if count == 0:
        raise UserError(f"the text holds {len(stream)} tokens, fewer than one sequence of {length}")
    windows = torch.tensor(stream[: count * length], dtype=torch.long).view(count, length)
    return torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), windows], dim=1)


class SequenceDataset(Dataset):
    """Packed sequences, with the reference id each chunk retrieved (continual stage).

    Args:
        sequences: `(N, T + 1)` long.
        pairing: `(N, C)` long reference ids (−1 none), or None for the warmup stage.
    """

    def __init__(self, sequences: Tensor, pairing: Tensor | None = None) -> None:
        self.sequences = sequences
        self.pairing = pairing

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"tokens": self.sequences[index]}
        if self.pairing is not None:
            item["references"] = self.pairing[index]
        return item


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way (to resume mid-epoch).

    Args:
        size: Dataset length.
        shuffle: Shuffle (a permutation seeded by `seed + epoch`) or keep order.
        seed: Base seed.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (Lightning calls this at each epoch start).

        Args:
            epoch: The epoch about to start, 0-based.
        """
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
        else:
            order = torch.arange(self.size)
        start, self.start = self.start, 0
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return self.size


class TextDataModule(L.LightningDataModule):
    """Text sources -> packed training and held-out sequences (+ reference pairing).

    A recipe's `data:` section is this constructor's arguments (`m3.recipes.sections`): the
    options below are documented here only, and `m3 check` holds a recipe to this
    signature. `m3 fit` sets `tokenizer`, `seed`, `chunker`, `embedder` and `chunk_length`
    from the rest of the recipe, and `memories` from `training.memories`.

    Args:
        tokenizer: Turns text into token ids.
        train: Sources of training text (kind `source`, e.g. `FilesSource([paths])`),
            concatenated; training stages need them.
        val: Sources of held-out text; when None, `val_fraction` of the training sequences
            is held out.
        knowledge: For the continual stage: sources of the knowledge base; its documents are
            cut into references by `chunker` and each training chunk is paired with one.
        val_fraction: Share of training sequences held out when `val` is None.
        seq_length: Tokens per training sequence after the BOS (the paper: 2048).
        batch_size: Sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: Seed of the split and of the shuffling.
        chunker: Cuts the knowledge base into references; required with `knowledge`. Give
            the bank's, `m3.recipes.build(recipe, "chunker")` (by default fixed at the
            model's `reference_length`), so that the pairing's reference ids are the bank's.
        embedder: Embeds chunks and references for the pairing; m3's default embedder
            (`m3.recipes.defaults`, `HashedNgramEmbedder()`) when None.
        chunk_length: Tokens per chunk (the model's `chunk_length`).
        threshold: Leakage threshold of the reference pairing (the paper: 0.9).
        candidates: Search hits tried per chunk when pairing.
        pairing_file: Where the pairing is cached with a fingerprint of its inputs (`m3 fit`:
            `pairing.pt` in the run folder); reused when the fingerprint matches, refused
            (naming both) when it does not. Unless the bank of `memories` has a table of
            these references, the knowledge base's reference table is written next to it
            (`m3.training.pairing.pairing_table`: `pairing.references/`) by `setup`.
        memories: For a continual stage with `encode="store"`, and only then: the bank
            folder that `m3 build-memory` wrote from the same knowledge base, chunker and
            tokenizer, with the weights training starts from (`training.memories`; `m3 fit`
            checks all of that before training). Batches then carry the memories of their
            references, read from its store, instead of their token ids to encode;
            `check_memories` checks that the bank fits.
        distractors: For the continual stage: besides the references of its window, every
            training chunk also reads this many references that other sequences of its batch
            retrieved (`m3.training.collate.ContinualCollator`), so that it learns to
            ignore memories that are not about its text, as it must at inference, where
            most of a chunk's `k` memories are about something else; None or 0: none (the
            paper's setting). Held-out batches read only their own.
        previous_share: For the continual stage: the share of training sequences whose chunk
            *c* reads the references of chunks *c−5..c−1* (what the previous chunks
            retrieved, as in generation) instead of *c−4..c*
            (`m3.training.collate.ContinualCollator`); None or 0: none (the paper's setting).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        train: Sequence[TextSource],
        *,
        val: Sequence[TextSource] | None = None,
        knowledge: Sequence[TextSource] | None = None,
        val_fraction: Annotated[float, Bounds(ge=0, lt=1)] = 0.05,
        seq_length: Annotated[int, Bounds(ge=1)] = 256,
        batch_size: Annotated[int, Bounds(ge=1)] = 8,
        num_workers: Annotated[int, Bounds(ge=0)] = 0,
        seed: int = 0,
        chunker: Chunker | None = None,
        embedder: Embedder | None = None,
        chunk_length: int = 64,
        threshold: Annotated[float, Bounds(ge=0, le=1)] = 0.9,
        candidates: Annotated[int, Bounds(ge=1)] = 8,
        pairing_file: str | Path | None = None,
        memories: str | Path | None = None,
        distractors: Annotated[int, Bounds(ge=0)] | None = None,
        previous_share: Annotated[float, Bounds(ge=0, le=1)] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if seq_length < chunk_length:
            raise UserError(f"seq_length ({seq_length}) is shorter than one chunk ({chunk_length})")
        if knowledge is not None and chunker is None:
            raise UserError(
                "TextDataModule: knowledge needs the chunker that cuts it into references: the "
                "bank's, m3.recipes.build(recipe, 'chunker'), e.g. "
                "FixedChunker(config.reference_length)"
            )
        self.tokenizer = tokenizer
        self.train_sources, self.val_sources = list(train), None if val is None else list(val)
        self.val_fraction, self.seq_length, self.batch_size = val_fraction, seq_length, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.knowledge = None if knowledge is None else list(knowledge)
        self.chunker = chunker
        self.embedder = embedder or registry.instantiate("embedder", default_spec("embedder"))
        self.chunk_length, self.threshold, self.candidates = chunk_length, threshold, candidates
        self.pairing_file = None if pairing_file is None else Path(pairing_file)
        self.memories = None if memories is None else Path(memories)
        if distractors is not None and distractors < 0:
            raise UserError(f"distractors must be ≥ 0, got {distractors}")
        self.distractors = distractors or 0
        if previous_share is not None and not 0 <= previous_share <= 1:
            raise UserError(f"previous_share must lie in [0, 1], got {previous_share}")
        self.previous_share = previous_share or 0.0
        # the knowledge base's references, id = position: a reference table or a list
        self.references: Sequence[Reference] = []
        self._unwritten: tuple[list[Any], int] | None = None  # documents for setup's table
        self.train_set: SequenceDataset | None = None
        self.val_set: SequenceDataset | None = None
        self._split: tuple[Tensor, Tensor] | None = None  # (train, held-out), by read_data
        self._sampler: EpochSampler | None = None
        self._position = {"epoch": 0, "samples": 0}

    # ----------------------------------------------------------------------------- building
    def _sequences(self, sources: Sequence[TextSource], key: str) -> tuple[Tensor, int]:
        """Packed sequences of some sources (maybe none) and their tokens, EOS included."""
        try:
            documents = gather(list(sources))
        except UserError as error:
            raise UserError(f"data.{key}: {error}") from None
        tokens, tok = 0, self.tokenizer

        def tokenized() -> Iterable[list[int]]:
            nonlocal tokens
            for document in documents:
                tokens += len(ids := tok.encode(document.text)) + 1  # and the EOS
                yield ids

        try:
            packed = pack(tokenized(), length=self.seq_length, bos_id=tok.bos_id, eos_id=tok.eos_id)
        except UserError:  # fewer tokens than one sequence: the caller names the split
            packed = torch.empty(0, self.seq_length + 1, dtype=torch.long)
        return packed, tokens

    def read_data(self) -> None:
        """Read, tokenize, pack, split the text, read the knowledge base; write nothing.

        Every check of the user's data (`m3 fit` calls it before claiming its folder): the
        training split must fill one batch (`batch_size` sequences: the last partial batch
        is dropped, so fewer would train 0 steps), `val`'s text one sequence.

        Raises:
            UserError: Naming the split (`data.train`, `data.val`, `data.knowledge`) and, for
                too little text, the tokens and sequences it holds and what is needed.
        """
        if self._split is not None:
            return
        sequences, tokens = self._sequences(self.train_sources, "train")
        length, held = self.seq_length, ""
        if self.val_sources is not None:
            train, (held_out, val_tokens) = sequences, self._sequences(self.val_sources, "val")
            if len(held_out) == 0:
                raise UserError(
                    f"data.val: the held-out text holds {val_tokens:,} tokens, fewer than one "
                    f"sequence of data.seq_length {length} tokens: add text, or lower the length"
                )
        else:
            seeded = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(sequences), generator=seeded)
            n_val = max(1, round(len(sequences) * self.val_fraction)) if self.val_fraction else 0
            train, held_out = sequences[order[n_val:]], sequences[order[:n_val]]
            if len(held_out):
                held = f", {len(held_out)} of them held out (data.val_fraction {self.val_fraction})"
                held += f", which leaves {len(train)}"
        if len(train) < self.batch_size:
            raise UserError(
                f"data.train: the training text holds {tokens:,} tokens: {len(sequences)} "
                f"sequence(s) of data.seq_length {length} tokens{held}; one batch needs "
                f"data.batch_size {self.batch_size} sequences ({self.batch_size} × {length} = "
                f"{self.batch_size * length:,} tokens, the last partial batch is dropped): "
                "give more training text, or lower data.batch_size or data.seq_length"
            )
        if self.knowledge is not None:
            self._find_references()
        self._split = train, held_out

    def build_references(self) -> list[Reference]:
        """Tokenize the knowledge base and cut it into references, in memory (ids = positions)."""
        if self.knowledge is None:
            raise UserError(
                "the continual stage needs data.knowledge: the knowledge base's sources"
            )
        from m3.bank.knowledge import read_knowledge  # the one definition of reference ids

        return list(read_knowledge(self.knowledge, self.tokenizer, chunker=self.chunker).references)

    def _find_references(self) -> None:
        """Read and check the knowledge base; find its references (`m3.training.pairing`).

        The bank's table of these documents when `memories` has one; else, with a pairing
        file, the documents are kept for `setup` to write a table next to it (after `m3 fit`
        claimed the run folder: nothing is written here); else the references are cut in
        memory.
        """
        if self.references or self._unwritten is not None or self.knowledge is None:
            return
        if self.memories is None and self.pairing_file is None:
            self.references = self.build_references()
            return
        from m3.bank.knowledge import empty_knowledge, read_documents

        documents, skipped = read_documents(self.knowledge)
        if not any(d.text.strip() for d in documents):
            raise empty_knowledge(self.knowledge, skipped)
        if self.memories is not None and self.memories.is_dir():
            table = reference_table_for(self.memories, documents, self.tokenizer, self.chunker)
            if table is not None:
                self.references = table
                return
        if self.pairing_file is not None:
            self._unwritten = documents, skipped
        else:  # a bank without a table of these documents, and no pairing file
            self.references = self.build_references()

    def _references_ready(self) -> Sequence[Reference]:
        """The references, writing the table of the pairing file's folder if it is due."""
        self._find_references()
        if self._unwritten is not None and self.pairing_file is not None:
            from m3.bank.knowledge import empty_knowledge
            from m3.bank.table import write_table

            documents, skipped = self._unwritten
            assert self.chunker is not None
            trainer = self.trainer  # the ranks of a run share the shards' work
            rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
            table = write_table(
                pairing_table(self.pairing_file), documents, self.tokenizer,
                chunker=self.chunker, skipped=skipped, rank=rank, world=world,
            )  # fmt: skip
            if len(table) == 0:
                raise empty_knowledge(self.knowledge or [], table.skipped)
            self.references, self._unwritten = table, None
        return self.references

    def check_memories(self, model: Memory3) -> None:
        """Check that the bank of `memories` holds memories of these references for `model`.

        Call it before training, with the weights that start it (`training.init_weights`):
        the bank was written by them, and training moves away from them (frozen memories go
        stale, the paper's "frozen" option). Builds the references if `setup` has not.

        Args:
            model: The model about to be trained, with its initial weights.

        Raises:
            UserError: Naming `training.memories`, for a folder that is not a finished bank; a
                bank of another number of references, of another tokenizer or reference
                prefix, or whose stored token ids differ from the knowledge base's; memories
                of another shape or written by other weights.
        """
        if self.memories is None:
            raise UserError("training.memories: no bank folder was given to read memories from")
        self._find_references()
        if not self.references:  # before the run folder is claimed: nothing is written yet
            self.references = self.build_references()
        store, manifest = open_memory_store(self.memories)
        try:
            self._check_bank(store, manifest, model)
        finally:
            store.close()

    def _check_bank(self, store: MemoryStore, manifest: dict[str, Any], model: Memory3) -> None:
        where = f"training.memories: {self.memories}"
        count = manifest.get("references")
        if count != len(self.references) or len(store) != len(self.references):
            raise UserError(
                f"{where} holds {count} references ({len(store)} stored), but data.knowledge "
                f"cut by this recipe's chunker gives {len(self.references)}: build the bank "
                "from the same knowledge base and chunker"
            )
        tokenizer = self.tokenizer.fingerprint()
        if store.info.tokenizer_fingerprint and store.info.tokenizer_fingerprint != tokenizer:
            raise UserError(
                f"{where} was written with tokenizer {store.info.tokenizer_fingerprint[:16]}, "
                f"this recipe's is {tokenizer[:16]}: build the bank with the same tokenizer"
            )
        prefix = tuple(self.tokenizer.reference_prefix())
        if store.info.reference_prefix and store.info.reference_prefix != prefix:
            raise UserError(
                f"{where} encoded references after the prefix {list(store.info.reference_prefix)}"
                f", this recipe's tokenizer gives {list(prefix)}"
            )
        # the manifest records no fingerprint of the knowledge base: compare the token ids
        # the bank stored with the references' at a few ids spread over the whole range
        picks = sorted({round(i * (len(self.references) - 1) / 15) for i in range(16)})
        ours = reference_tokens(self.references, picks)
        for reference_id, stored, tokens in zip(picks, store.references(picks), ours, strict=True):
            if list(stored.ids) != tokens:
                raise UserError(
                    f"{where}: reference {reference_id} holds other tokens than data.knowledge's "
                    "reference of that id: build the bank from the same knowledge base and "
                    "chunker"
                )
        store.info.check_model(model.config.memory_shape, model.memory_fingerprint(), where=where)

    def setup(self, stage: str | None = None) -> None:
        """Tokenize, pack, split (`read_data`) and, for the continual stage, pair.

        Args:
            stage: Lightning's stage name ("fit", "validate", …); the work is the same for
                all and done once.
        """
        if self.train_set is not None:
            return
        self.read_data()
        train, held_out = self._split or ()
        train_pairs = val_pairs = None
        if self.knowledge is not None:
            self._references_ready()
            train_pairs, val_pairs = self._pairing(train, held_out)
        self.train_set = SequenceDataset(train, train_pairs)
        self.val_set = SequenceDataset(held_out, val_pairs) if len(held_out) else None

    def _pairing(self, train: Tensor, held_out: Tensor) -> tuple[Tensor, Tensor]:
        key = pairing_fingerprint(
            train, held_out, self.references, self.embedder.fingerprint(),
            self.chunk_length, self.threshold, self.candidates,
        )  # fmt: skip
        if self.pairing_file is not None and self.pairing_file.is_file():
            saved = torch.load(self.pairing_file, weights_only=True)
            if saved.get("fingerprint") != key:
                raise UserError(
                    f"{self.pairing_file} pairs other data (fingerprint "
                    f"{str(saved.get('fingerprint'))[:12]}, this data {key[:12]}): delete it or "
                    "choose another data.pairing_file"
                )
            return saved["train"], saved["val"]
        from m3.bank.build import build_index  # the bank builder's index, built the same way

        index = build_index(self.references, self.tokenizer, self.embedder)
        common = dict(
            tokenizer=self.tokenizer, embedder=self.embedder, index=index,
            chunk_length=self.chunk_length, threshold=self.threshold, candidates=self.candidates,
        )  # fmt: skip
        train_pairs = pair_references(train, self.references, **common)
        val_pairs = (
            pair_references(held_out, self.references, **common) if len(held_out) else held_out
        )
        if self.pairing_file is not None:
            self.pairing_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"fingerprint": key, "train": train_pairs, "val": val_pairs}, self.pairing_file
            )
        return train_pairs, val_pairs

    # ----------------------------------------------------------------------------- loaders
    def _collate(self, *, train: bool = False) -> ContinualCollator | None:
        if not self.references:
            return None
        return ContinualCollator(
            self.references,
            memories=self.memories,
            distractors=self.distractors if train else 0,
            previous_share=self.previous_share if train else 0.0,
            seed=self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, resuming at the saved data position."""
        assert self.train_set is not None, "call setup() first"
        self._sampler = EpochSampler(len(self.train_set), shuffle=True, seed=self.seed)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if epoch == self._position["epoch"]:  # resuming inside this epoch: skip what was seen
            self._sampler.set_epoch(epoch)
            self._sampler.start = self._position["samples"]
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=self._sampler, drop_last=True,
            num_workers=self.num_workers, collate_fn=self._collate(train=True),
            persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        """Held-out batches in order."""
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=self._collate(),
        )  # fmt: skip

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training samples consumed, for `state_dict`.

        Args:
            batch: The batch about to move to the device; returned unchanged.
            dataloader_idx: Index of the dataloader it came from.

        Returns:
            The batch.
        """
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if epoch != self._position["epoch"]:
                self._position = {"epoch": epoch, "samples": 0}
            self._position["samples"] += batch["tokens"].shape[0]
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position: epoch and samples consumed in it (saved in checkpoints)."""
        return dict(self._position)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position, so that a resumed run sees the batches it had not seen.

        Args:
            state_dict: What `state_dict` returned: the epoch and the samples consumed in it.
        """
        self._position = {"epoch": int(state_dict["epoch"]), "samples": int(state_dict["samples"])}
