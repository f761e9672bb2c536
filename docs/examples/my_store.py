"""A memory store that keeps one file per reference.

The worked example of the guide "Writing your own component"
(docs/guides/writing-a-component.md); `tests/test_example_store.py` runs m3's store
contract suite on it.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import (
    CorruptReferenceError,
    MemoryStore,
    MissingReferenceError,
    StoreInfo,
)
from m3.backends.in_memory import as_reference_ids, check_write, normalise_reference
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Reference


class DirectoryStore(MemoryStore):
    """One file per reference in a directory, next to an `info.json` describing the store.

    A reference's file holds its memory and provenance (`torch.save` of a dict of tensors
    and plain values) followed by the crc32 of those bytes. Files are written to a temporary
    name and renamed, so a crash never leaves half a file under a reference's name. The
    store keeps no open file: it pickles as its path and info.

    Args:
        directory: The store's folder; created when `info` is given.
        info: What the store holds, to create a store (or reopen one with the same info);
            None opens an existing store and reads its info from `info.json`.
    """

    def __init__(self, directory: str | Path, *, info: StoreInfo | None = None) -> None:
        self.directory = Path(directory)
        info_file = self.directory / "info.json"
        stored = StoreInfo.from_json(info_file.read_text()) if info_file.exists() else None
        if info is None and stored is None:
            raise UserError(f"{self.directory} is not a DirectoryStore: it has no info.json")
        if info is not None and stored is not None and info != stored:
            raise UserError(f"{self.directory} already holds a store with other info")
        if info is not None and stored is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            info_file.write_text(info.to_json())
        self.info = info or stored  # type: ignore[assignment]

    def _file(self, reference_id: int) -> Path:
        return self.directory / f"{reference_id}.ref"

    def _load(self, reference_id: int) -> dict:
        try:
            data = self._file(reference_id).read_bytes()
        except FileNotFoundError:
            message = f"reference {reference_id} is not in {self.directory}"
            raise MissingReferenceError(message) from None
        body, crc = data[:-4], data[-4:]
        if len(data) < 4 or zlib.crc32(body) != int.from_bytes(crc, "little"):
            message = f"reference {reference_id} in {self.directory} fails its checksum"
            raise CorruptReferenceError(message)
        return torch.load(io.BytesIO(body), weights_only=True)

    def write(
        self, ids: Sequence[int] | Tensor, memory: SparseMemory, references: Sequence[Reference]
    ) -> None:
        """Add references, or overwrite the ones already stored (see `MemoryStore.write`).

        Args:
            ids: `(N,)` int64 reference ids (distinct, ≥ 0).
            memory: Their sparse memories, keys and values `(N, L_mem, H_kv, k, d_h)`.
            references: Their token ids and provenance, in the same order.
        """
        where = str(self.directory)
        array = check_write(self.info, ids, memory, references, where=where)  # before any file
        memory = memory.to(dtype=self.info.torch_dtype)
        for row, reference_id in enumerate(array.tolist()):
            doc_id, start, end, tokens = normalise_reference(references[row])
            record = {  # clone: torch.save of a view would save the whole batch
                "keys": memory.keys[row].clone(),
                "values": memory.values[row].clone(),
                "valid": memory.valid[row].clone(),
                "positions": memory.positions[row].to(torch.long).clone(),
                "reference": [doc_id, start, end, list(tokens)],
            }
            buffer = io.BytesIO()
            torch.save(record, buffer)
            body = buffer.getvalue()
            temporary = self._file(reference_id).with_suffix(".tmp")
            temporary.write_bytes(body + zlib.crc32(body).to_bytes(4, "little"))
            os.replace(temporary, self._file(reference_id))

    def read(self, ids: Sequence[int] | Tensor) -> SparseMemory:
        """Read memories in the order asked, repeats allowed (see `MemoryStore.read`).

        Args:
            ids: `(N,)` reference ids.

        Returns:
            Keys and values `(N, L_mem, H_kv, k, d_h)` in `info.torch_dtype`, valid `(N, k)`,
            positions `(N, L_mem, H_kv, k)`.
        """
        array = as_reference_ids(ids, where=str(self.directory))
        records = [self._load(i) for i in array.tolist()]
        if not records:
            layers, _, heads, tokens, dim = self.info.memory_shape
            keys = torch.empty(0, layers, heads, tokens, dim, dtype=self.info.torch_dtype)
            valid = torch.empty(0, tokens, dtype=torch.bool)
            positions = torch.empty(0, layers, heads, tokens, dtype=torch.long)
            return SparseMemory(keys, keys.clone(), valid, positions)
        fields = ("keys", "values", "valid", "positions")
        return SparseMemory(*(torch.stack([r[name] for r in records]) for name in fields))

    def references(self, ids: Sequence[int] | Tensor) -> list[Reference]:
        """The token ids and provenance of references.

        Args:
            ids: `(N,)` reference ids.

        Returns:
            One `Reference` per id, in order.
        """
        array = as_reference_ids(ids, where=str(self.directory))
        found = [self._load(i)["reference"] for i in array.tolist()]
        return [Reference(doc_id, start, end, tuple(t)) for doc_id, start, end, t in found]

    def delete(self, ids: Sequence[int] | Tensor) -> None:
        """Remove references; nothing is removed when one of them is not stored.

        Args:
            ids: `(N,)` reference ids.
        """
        array = as_reference_ids(ids, where=str(self.directory)).tolist()
        for reference_id in array:
            if reference_id not in self:
                raise MissingReferenceError(f"reference {reference_id} is not in {self.directory}")
        for reference_id in array:
            self._file(reference_id).unlink()

    def ids(self) -> Tensor:
        """All stored reference ids, `(N,)` int64, ascending."""
        stored = sorted(int(path.stem) for path in self.directory.glob("*.ref"))
        return torch.tensor(stored, dtype=torch.long)

    def __contains__(self, reference_id: object) -> bool:
        if isinstance(reference_id, bool) or not isinstance(reference_id, (int, np.integer)):
            return False
        return self._file(int(reference_id)).exists()

    def verify(self, ids: Sequence[int] | Tensor | None = None) -> list[int]:
        """Check stored bytes against their checksums.

        Args:
            ids: References to check; all when None.

        Returns:
            The ids whose files are damaged, ascending.
        """
        todo = self.ids() if ids is None else as_reference_ids(ids, where=str(self.directory))
        damaged = []
        for reference_id in sorted(int(i) for i in todo):
            try:
                self._load(reference_id)
            except CorruptReferenceError:
                damaged.append(reference_id)
        return damaged
