"""The redo journal of earlier m3 versions, whose edits changed a bank's shards in place.

Edits now write layers and commit with one rename of the manifest (`m3.bank.layers`): they
need no journal. A bank that an earlier m3 was editing when it stopped still holds that
edit's journal, and `m3 edit BANK --resume` (`m3.bank.edit.resume_edit`) finishes it here:

1. the earlier edit computed everything first and wrote it to `edit-journal.tmp/`; then
   `done.json` moved into it and the folder was renamed `edit-journal/`, its commit point;
2. applying the journal writes and deletes in the shards (each marked complete again),
   updates the index, saves it to `index.tmp/` and swaps it in by renames, and replaces
   the manifest atomically;
3. `done.json` moves back and the journal is removed.

Every step of 2 is idempotent, and needs neither the model nor the texts. An uncommitted
journal is rolled back (the bank is as it was before that edit).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from m3.backends.base import MemoryIndex
from m3.backends.hdf5_store import HDF5Store
from m3.bank.layers import remove_from_index
from m3.bank.layout import DONE, EDIT_JOURNAL, MANIFEST
from m3.core import registry
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Reference

if TYPE_CHECKING:
    from m3.bank.edit import EditSummary

#: The committed journal of an edit in progress, in the bank folder.
JOURNAL = EDIT_JOURNAL
#: A journal being written (not committed: the bank is unchanged).
PENDING = "edit-journal.tmp"


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
    from m3.bank.edit import EditSummary  # m3.bank.edit imports this module

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
