"""The redo journal that makes a knowledge edit atomic and resumable.

**Crash safety: a redo journal.** An edit never leaves a bank that opens as complete while
its store and index disagree:

1. Everything is computed first (memories, embeddings, the new manifest) and written to
   `edit-journal.tmp/`; then `done.json` moves into it (from now on `open_bank` refuses the
   bank as unfinished) and the folder is renamed `edit-journal/`, the commit point.
2. The journal is applied: shard writes and deletes (each shard marked complete again),
   the index updated, saved to `index.tmp/` and swapped in by renames, the manifest
   replaced atomically (`os.replace`).
3. `done.json` moves back and the journal is removed.

Every step of 2 is idempotent, so an interrupted edit is finished by `resume_edit(folder)`
(or `m3 edit BANK --resume`), which needs neither the model nor the new texts: the journal
holds them. An edit interrupted before its commit point leaves the bank as it was (the next
edit or resume rolls the partial journal back). Each edit costs what it changes plus one
save of the index, not a copy of the bank.

```python
summary = edit_bank(
    "runs/tiny/bank",
    model=model,
    tokenizer=tokenizer,
    replace={"person-0007.1": "Velmora Quist worked as a tailor."},
    delete=["place-0003.0"],
)
```

Whether a bank's answers follow its edits is measured by `m3.inference.edits.measure_edits`.

A `Retriever` caches memories by reference id: open the bank again after editing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3.backends.base import MemoryIndex, MissingReferenceError
from m3.backends.hdf5_store import HDF5Store
from m3.bank.layout import DONE, EDIT_JOURNAL, EDIT_LOCK, MANIFEST
from m3.core import registry
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Reference

#: The committed journal of an edit in progress, in the bank folder.
JOURNAL = EDIT_JOURNAL
#: A journal being written (not committed: the bank is unchanged).
PENDING = "edit-journal.tmp"


@dataclass(frozen=True)
class EditSummary:
    """What an edit changed.

    Attributes:
        bank: The bank folder.
        documents_replaced: Documents whose text was replaced.
        documents_deleted: Documents removed.
        references_written: References whose memories were written (new or overwritten).
        references_removed: Reference ids removed from the store and the index (those of
            deleted documents, and of replaced documents whose reference count changed).
        references: References in the bank after the edit.
        bytes_written: Bytes of the written keys and values as stored (codes when the bank
            is quantized).
        store_bytes: Bytes of the store's shard files after the edit.
        written_ids: The ids written, ascending.
        removed_ids: The ids removed, ascending.
    """

    bank: Path
    documents_replaced: int
    documents_deleted: int
    references_written: int
    references_removed: int
    references: int
    bytes_written: int
    store_bytes: int
    written_ids: tuple[int, ...] = ()
    removed_ids: tuple[int, ...] = ()

    def describe(self) -> str:
        """One line for people: documents, references and bytes (decimal, with separators)."""
        return (
            f"{self.bank}: {self.documents_replaced} documents replaced, "
            f"{self.documents_deleted} deleted; {self.references_written} references written, "
            f"{self.references_removed} removed, {self.references} in the bank; "
            f"{self.bytes_written:,} bytes of memories written ({self.store_bytes:,} bytes "
            "in the store)"
        )


@contextlib.contextmanager
def edit_lock(folder: Path) -> Iterator[None]:
    """Hold the bank's edit lock (`edit.lock`, an advisory `flock`) for one edit.

    Taken before an edit reads its journal state, so that two edits never see each other's
    half-written journal; released when the process ends, however it ends.

    Args:
        folder: The bank folder.

    Raises:
        UserError: When another process is editing the bank (nothing is changed then).
    """
    path = folder / EDIT_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(
                f"{folder} is being edited by another process (pid {holder}): wait for that "
                "edit to finish, then run yours again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_for_edit(folder: Path, manifest: dict[str, Any]) -> list[HDF5Store]:
    """Open every shard of a bank to write, before an edit's commit point.

    Args:
        folder: The bank folder.
        manifest: Its manifest (names the shards).

    Returns:
        The shards, writable; the caller closes them.

    Raises:
        UserError: When a shard is open in another process (a reader holds HDF5's file
            lock): nothing is changed then.
    """
    stores: list[HDF5Store] = []
    try:
        for shard in manifest["shards"]:
            stores.append(HDF5Store(folder / shard["file"], mode="a"))
    except UserError as error:
        for store in stores:
            store.close()
        raise UserError(
            f"cannot edit {folder}: {error}. An edit changes the shards in place, so it needs "
            "them to itself: close the processes that read the bank (m3 generate, m3 evaluate, "
            "a Retriever) and edit again; nothing was changed"
        ) from None
    return stores


def journal_state(folder: Path) -> str:
    """Where a bank's edit stands.

    Args:
        folder: The bank folder.

    Returns:
        'clean', 'pending' (an uncommitted journal) or 'committed'.
    """
    if (folder / JOURNAL).is_dir():
        return "committed"
    if (folder / PENDING).is_dir():
        return "pending"
    return "clean"


def roll_back(folder: Path) -> None:
    """Drop an uncommitted journal: nothing of it was applied.

    Args:
        folder: The bank folder.
    """
    pending = folder / PENDING
    if (pending / DONE).is_file() and not (folder / DONE).exists():
        os.replace(pending / DONE, folder / DONE)
    shutil.rmtree(pending)


def check_no_journal(folder: Path) -> None:
    """Make sure no edit is under way: roll an uncommitted journal back, refuse a committed one.

    Args:
        folder: The bank folder.

    Raises:
        UserError: When a committed edit waits to be finished (`resume_edit`).
    """
    state = journal_state(folder)
    if state == "pending":
        roll_back(folder)
    elif state == "committed":
        raise UserError(
            f"{folder} has an interrupted edit ({JOURNAL}/): finish it first with "
            f"m3 edit {folder} --resume (or m3.bank.edit.resume_edit)"
        )


def write_journal(
    folder: Path,
    plan: dict[str, Any],
    memory: SparseMemory | None,
    references: Sequence[Reference],
    embeddings: torch.Tensor | None,
) -> Path:
    """Write an edit's journal and commit it (step 1 above).

    Args:
        folder: The bank folder.
        plan: What the edit does to store, index and manifest (JSON-serialisable).
        memory: The new references' memories, `(N, L_mem, H_kv, k, d_h)`; None when the
            edit only deletes.
        references: The new references, in the order of `memory`'s rows.
        embeddings: Their embeddings, `(N, dim)`; None with `memory`.

    Returns:
        The committed journal folder.
    """
    pending = folder / PENDING
    if pending.exists():
        shutil.rmtree(pending)
    pending.mkdir()
    payload: dict[str, Any] = {
        "references": [[str(r.doc_id), r.start, r.end, list(r.ids)] for r in references],
        "doc_is_int": [not isinstance(r.doc_id, str) for r in references],
    }
    if memory is not None and embeddings is not None:
        payload.update(
            keys=memory.keys.contiguous(), values=memory.values.contiguous(),
            valid=memory.valid.contiguous(), positions=memory.positions.contiguous(),
            embeddings=embeddings.contiguous(),
        )  # fmt: skip
    torch.save(payload, pending / "payload.pt")
    (pending / "plan.json").write_text(json.dumps(plan, indent=1))
    os.replace(folder / DONE, pending / DONE)  # the bank reads as unfinished from here on
    os.replace(pending, folder / JOURNAL)  # the commit point
    return folder / JOURNAL


def read_journal(
    journal: Path,
) -> tuple[dict[str, Any], SparseMemory | None, list[Reference], torch.Tensor | None]:
    """Read back what `write_journal` wrote.

    Args:
        journal: The committed journal folder.

    Returns:
        The plan, the memories, the references and the embeddings.
    """
    plan = json.loads((journal / "plan.json").read_text())
    payload = torch.load(journal / "payload.pt", weights_only=True)
    references = [
        Reference(int(d) if is_int else d, int(s), int(e), tuple(int(t) for t in ids))
        for (d, s, e, ids), is_int in zip(payload["references"], payload["doc_is_int"], strict=True)
    ]
    memory = embeddings = None
    if "keys" in payload:
        memory = SparseMemory(
            payload["keys"], payload["values"], payload["valid"], payload["positions"]
        )
        embeddings = payload["embeddings"]
    return plan, memory, references, embeddings


def remove_from_index(index: MemoryIndex, ids: Sequence[int]) -> None:
    """Remove ids from an index, skipping those already gone (a resumed edit).

    Args:
        index: The bank's index.
        ids: The reference ids to remove.
    """
    if not ids:
        return
    try:
        index.remove(torch.tensor(list(ids), dtype=torch.long))
    except MissingReferenceError:
        for reference_id in ids:
            with contextlib.suppress(MissingReferenceError):
                index.remove(torch.tensor([reference_id], dtype=torch.long))


def shard_owners(ids: Sequence[int], held: Sequence[set[int]]) -> list[int]:
    """The shard each written id goes to: the one that holds it, else `id % shards`.

    Args:
        ids: The reference ids written.
        held: Per shard, the ids it holds now.

    Returns:
        Per id, the index of its shard.
    """
    return [next((n for n, shard in enumerate(held) if i in shard), i % len(held)) for i in ids]


def apply_journal(
    folder: Path, index: MemoryIndex | None = None, stores: list[HDF5Store] | None = None
) -> EditSummary:
    """Apply the committed journal of `folder` (idempotent), then finish the edit.

    Args:
        folder: The bank folder.
        index: The bank's index, when the caller has it open already; loaded when None.
        stores: Its shards, open to write (`open_for_edit`); opened here when None. Closed
            here either way.

    Returns:
        What the edit changed.
    """
    journal = folder / JOURNAL
    plan, memory, references, embeddings = read_journal(journal)
    manifest = plan["manifest"]
    written, removed = list(plan["written"]), list(plan["removed"])

    # 1. the store: deletes, then writes, each shard marked complete again
    files = [folder / s["file"] for s in manifest["shards"]]
    stores = open_for_edit(folder, manifest) if stores is None else stores
    try:
        held = [set(s.ids().tolist()) for s in stores]
        for store, ids in zip(stores, held, strict=True):
            gone = sorted(ids.intersection(removed))
            if gone:
                store.delete(gone)
        if written:
            if memory is None:
                raise UserError(f"{journal}: the journal lacks the memories it writes")
            owners = shard_owners(written, held)
            for shard in sorted(set(owners)):
                chosen = [row for row, owner in enumerate(owners) if owner == shard]
                stores[shard].write(
                    torch.tensor([written[r] for r in chosen], dtype=torch.long),
                    memory[torch.tensor(chosen, dtype=torch.long)],
                    [references[r] for r in chosen],
                )
        for store in stores:
            store.mark_complete()
    finally:
        for store in stores:
            store.close()

    # 2. the index: updated, saved beside the old one, swapped in by renames
    current, old, new = folder / "index", folder / "index.old", folder / "index.tmp"
    if not current.exists() and old.exists():
        os.replace(old, current)  # interrupted between the two renames below
    for stale in (old, new):
        if stale.exists():
            shutil.rmtree(stale)
    if index is None:
        index = registry.class_of(manifest["index"]["class"], "index").load(current)
    remove_from_index(index, removed)
    if written:
        index.add(embeddings, torch.tensor(written, dtype=torch.long))  # type: ignore[arg-type]
    index.build()
    index.save(new)
    os.replace(current, old)
    os.replace(new, current)
    shutil.rmtree(old)

    # 3. the manifest, atomically; then the bank is complete again
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST)
    if (journal / DONE).is_file():
        os.replace(journal / DONE, folder / DONE)
    shutil.rmtree(journal)
    return EditSummary(
        bank=folder,
        documents_replaced=len(plan["replaced"]),
        documents_deleted=len(plan["deleted"]),
        references_written=len(written),
        references_removed=len(removed),
        references=int(manifest["references"]),
        bytes_written=int(plan["bytes_written"]),
        store_bytes=sum(p.stat().st_size for p in files),
        written_ids=tuple(sorted(written)),
        removed_ids=tuple(sorted(removed)),
    )


def resume_edit(folder: str | Path) -> EditSummary | None:
    """Finish an edit that was interrupted after its commit point.

    Needs no model: the journal holds the new memories and embeddings. An uncommitted
    journal is rolled back instead (the bank is as it was before that edit).

    Args:
        folder: The bank folder.

    Returns:
        The finished edit's summary; None when no committed edit was pending.
    """
    folder = Path(folder)
    with edit_lock(folder):
        state = journal_state(folder)
        if state == "pending":
            roll_back(folder)
        if state != "committed":
            return None
        return apply_journal(folder)


# ------------------------------------------------------------------------------ editing
