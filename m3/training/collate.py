"""Continual batches: the distinct references of a batch once, each row's pool and slots.

`ContinualCollator` turns items of `m3.training.datamodule.SequenceDataset` (packed
sequences with the reference each 64-token chunk retrieved) into what `Memory3Module`
reads: the batch's distinct references (encoded once, on the fly, or read from a memory
bank's store: `training.encode: store`), each row's pool of them and each chunk's slot in
it. Chunk *c* then reads the references of chunks *c−4..c* (paper §3.5, §5).

**Distractors** (`data.distractors`, an m3 option; the paper does not use it). A one-chunk
sequence reads only the reference its own text retrieved, which is almost always about
what it says; at inference a chunk reads `k` memories, most of them about something else
(ranks 2..k, or, as in generation, what the previous chunk's text retrieved). With
`distractors=n` every chunk of a row also reads `n` references that *other* rows of the
batch retrieved: they are encoded for those rows anyway, so they cost no encoding, only
the attention over their tokens. `open_memory_store` opens a bank's store for
`training.encode: store`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from m3.backends.base import MemoryStore
from m3.core.checks import right_pad
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Reference
from m3.training.pairing import reference_tokens


def open_memory_store(folder: str | Path) -> tuple[MemoryStore, dict[str, Any]]:
    """Open the store of a memory bank for `training.encode: store`, without its index.

    `m3.bank.open.open_bank_store`, with problems reported under `training.memories`.

    Args:
        folder: The bank folder (`training.memories`).

    Returns:
        The store and the bank's `manifest.json`.

    Raises:
        UserError: Naming `training.memories` and the folder, when it holds no finished bank
            or a shard that does not open.
    """
    from m3.bank.open import open_bank_store

    if not Path(folder).is_dir():
        raise UserError(
            f"training.memories: {folder} does not exist (expected the bank folder "
            "m3 build-memory wrote: build the bank first?)"
        )
    try:
        return open_bank_store(folder)
    except UserError as error:
        raise UserError(f"training.memories: {error}") from None


class ContinualCollator:
    """Builds a continual batch: the distinct references once, each row's pool and slots.

    The batch's distinct references come as token ids to encode (`reference_tokens`,
    `reference_lengths`), or, with `memories`, as their memories read from a bank's store
    by reference id (`memory_keys`, `memory_values`, `memory_valid`, `memory_positions`):
    nothing is encoded then. The store is opened lazily, once in each process that collates
    (each DataLoader worker), and is never pickled open.

    With `distractors`, each row's pool also holds up to that many references that other
    rows of the batch retrieved and this row did not, drawn at random (seeded by `seed` and
    the batch's reference ids, so that a batch collates the same way in every process and
    after a resume), and the batch carries `shared` `(B, M)` bool: the pool slots every
    chunk of the row sees besides its window.

    Args:
        references: The knowledge base's references (reference id = position, the ids
            `m3.bank.knowledge.read_knowledge` gives and the bank builder stores them under):
            a list, or a reference table (`m3.bank.table.ReferenceTable`), read by id for
            each batch (a table is pickled as its folder, and each worker maps it again).
        memories: A bank folder that `m3 build-memory` wrote (`training.memories`), to read
            the references' memories from instead of encoding them; None to encode.
        distractors: References of other rows each row also reads (0: none).
        previous_share: Share of the rows (drawn per batch, like the distractors) whose
            chunk *c* reads the references of chunks *c−5..c−1* instead of *c−4..c*: what
            the previous chunks retrieved, as in generation, where a chunk's memories are
            retrieved before it is written (its `slots` shift by one chunk; chunk 0 reads
            none of its own). 0: none.
        seed: Seed of the draws.
    """

    def __init__(
        self,
        references: Sequence[Reference],
        *,
        memories: str | Path | None = None,
        distractors: int = 0,
        previous_share: float = 0.0,
        seed: int = 0,
    ) -> None:
        if distractors < 0:
            raise UserError(f"distractors must be ≥ 0, got {distractors}")
        if not 0 <= previous_share <= 1:
            raise UserError(f"previous_share must lie in [0, 1], got {previous_share}")
        self.previous_share = previous_share
        self.references = references
        self.memories = None if memories is None else Path(memories)
        self.distractors, self.seed = distractors, seed
        self._store: MemoryStore | None = None

    @property
    def store(self) -> MemoryStore:
        """The bank's store, opened on first use in this process."""
        if self.memories is None:
            raise UserError("this collator encodes references: it was given no memories")
        if self._store is None:
            self._store = open_memory_store(self.memories)[0]
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None  # each worker opens its own
        return state

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Collate items of `SequenceDataset` into a batch for `Memory3Module`.

        Args:
            items: `B` items, each `tokens` `(T + 1,)` and `references` `(C,)` long (the
                reference id each chunk retrieved, −1 none).

        Returns:
            `tokens` `(B, T + 1)`, `pool` `(B, M)` (indices into the batch's distinct
            references, −1 empty), `slots` `(B, C)` (each chunk's own reference's slot in
            its row's pool, −1 none), `shared` `(B, M)` bool with `distractors`, and either
            `reference_tokens` `(U, R)` with `reference_lengths` `(U,)` or the `memory_*`
            tensors of the `U` distinct references.
        """
        tokens = torch.stack([item["tokens"] for item in items])
        retrieved = torch.stack([item["references"] for item in items])  # (B, C)
        unique = torch.unique(retrieved[retrieved >= 0])  # encoded (or read) once per batch
        rows = [torch.unique(r[r >= 0]) for r in retrieved]
        generator = self._generator(retrieved)
        extra = self._draw(generator, unique, rows)
        width = max(1, max(len(r) + len(e) for r, e in zip(rows, extra, strict=True)))
        pool = torch.full((len(items), width), -1, dtype=torch.long)
        shared = torch.zeros(len(items), width, dtype=torch.bool)
        slots = torch.full_like(retrieved, -1)
        for b, (row, more) in enumerate(zip(rows, extra, strict=True)):
            pool[b, : len(row)] = torch.searchsorted(unique, row)
            pool[b, len(row) : len(row) + len(more)] = torch.searchsorted(unique, more)
            shared[b, len(row) : len(row) + len(more)] = True
            hit = retrieved[b] >= 0
            slots[b, hit] = torch.searchsorted(row, retrieved[b, hit])
        if self.previous_share:  # these rows read what their previous chunks retrieved
            shifted = torch.rand(len(items), generator=generator) < self.previous_share
            slots[shifted] = torch.cat(
                [torch.full_like(slots[shifted, :1], -1), slots[shifted, :-1]], dim=1
            )
        if unique.numel() == 0:  # no chunk retrieved anything: one dummy reference, no slot uses it
            pool.fill_(-1)
        batch = {"tokens": tokens, "pool": pool, "slots": slots}
        if self.distractors:
            batch["shared"] = shared
        if self.memories is not None:
            return batch | self._read(unique)
        # a batch that retrieved nothing still carries one (padding) reference row
        rows = reference_tokens(self.references, unique.tolist()) or [[0]]
        padded, lengths = right_pad(rows, 0)
        return batch | {"reference_tokens": padded, "reference_lengths": lengths}

    def _generator(self, retrieved: Tensor) -> torch.Generator:
        """A generator seeded by `seed` and the batch's reference ids."""
        digest = hashlib.sha256(retrieved.numpy().tobytes()).digest()
        seed = (int.from_bytes(digest[:8], "little") + self.seed) % 2**63
        return torch.Generator().manual_seed(seed)

    def _draw(self, generator: torch.Generator, unique: Tensor, rows: list[Tensor]) -> list[Tensor]:
        """Per row, up to `distractors` of the batch's references the row did not retrieve."""
        if not self.distractors:
            return [unique[:0]] * len(rows)
        extra = []
        for row in rows:
            others = unique[~torch.isin(unique, row)]
            order = torch.randperm(len(others), generator=generator)[: self.distractors]
            extra.append(torch.sort(others[order]).values)
        return extra

    def _read(self, unique: Tensor) -> dict[str, Tensor]:
        store = self.store
        if unique.numel():
            memory = store.read(unique)
        else:  # the dummy reference: no valid token
            layers, _, heads, kept, dim = store.info.memory_shape
            memory = SparseMemory(
                torch.zeros(1, layers, heads, kept, dim, dtype=store.info.torch_dtype),
                torch.zeros(1, layers, heads, kept, dim, dtype=store.info.torch_dtype),
                torch.zeros(1, kept, dtype=torch.bool),
                torch.full((1, layers, heads, kept), -1, dtype=torch.long),
            )
        whole = torch.contiguous_format  # copies: store reads are views into a reused buffer
        return {
            "memory_keys": memory.keys.clone(memory_format=whole),
            "memory_values": memory.values.clone(memory_format=whole),
            "memory_valid": memory.valid.clone(memory_format=whole),
            "memory_positions": memory.positions.clone(memory_format=whole),
        }
