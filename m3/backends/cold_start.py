"""Cold start (paper §3.3): a reference is encoded the first time it is read, then stored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from m3.backends.base import MemoryStore
from m3.backends.checks import as_reference_ids
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference
from m3.memory.encoder import MemoryEncoder, encode_references
from m3.model.memory3 import Memory3

if TYPE_CHECKING:
    pass


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
        wanted = np.unique(as_reference_ids(ids, where=type(self).__name__))
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
        return [
            self.all_references[i]
            for i in as_reference_ids(ids, where=type(self).__name__).tolist()
        ]

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
