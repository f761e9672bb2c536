"""Knowledge editing: replace or delete documents of a memory bank without retraining.

A bank's references carry the id of the knowledge-base document they were cut from
(`Reference.doc_id`), so a document is addressed by that id (e.g. `person-0007.1`).
Replacing a document cuts its new text exactly as `m3 build-memory` cut the knowledge base
(`m3.bank.build.read_knowledge` with the bank's chunker), encodes the new references with the
model that wrote the bank (its fingerprint must be the store's), and writes their memories
and token ids to the store: under the document's old reference ids when it gives as many
references as before, else the old ids are deleted and the new references get ids above
every id the bank has used (`manifest["next_id"]`). The index drops the old embeddings and
gains the new ones, embedded with the bank's own saved embedder (not refitted). Deleting a
document removes its references from the store and the index. The manifest records the new
counts and an entry per edit in `manifest["edits"]`.

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
report = measure_edits("runs/tiny/bank", world.edits(50), model=model,
                       tokenizer=tokenizer, work_dir="runs/tiny/edits")
report.took_effect, report.before
```

A `Retriever` caches memories by reference id: open the bank again after editing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from m3.backends.base import MemoryIndex, MemoryStore, MissingReferenceError
from m3.bank.build import EDIT_JOURNAL
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Chunker, FixedChunker, Reference
from m3.data.documents import Document, read_jsonl
from m3.data.sources import TextSource

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.data.world import Edit
    from m3.inference.evaluate import ClozeScore
    from m3.memory.encoder import MemoryEncoder
    from m3.model.memory3 import Memory3
    from m3.recipes import Recipe

#: The committed journal of an edit in progress, in the bank folder.
JOURNAL = EDIT_JOURNAL
#: A journal being written (not committed: the bank is unchanged).
PENDING = "edit-journal.tmp"
_DONE = "done.json"
_MANIFEST = "manifest.json"
#: References whose provenance is read at a time when mapping documents to references.
_SCAN = 65536


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


# ------------------------------------------------------------------------------ reading a bank
class _Documents(TextSource):
    """Given documents as a source, so that `read_knowledge` cuts them."""

    def __init__(self, documents: Sequence[Document]) -> None:
        self._documents = list(documents)

    def documents(self) -> list[Document]:
        return list(self._documents)

    def describe(self) -> str:
        return f"{len(self._documents)} replacement documents"


def _shards(store: MemoryStore) -> list[MemoryStore]:
    return list(getattr(store, "shards", [store]))


def document_references(store: MemoryStore) -> dict[str, list[int]]:
    """Which references each document gave: document id -> reference ids.

    Args:
        store: A bank's store (an `HDF5Store` or a `ShardedStore`).

    Returns:
        Document id (as a string) -> its reference ids, in the order of their spans.
    """
    spans: dict[str, list[tuple[int, int]]] = {}
    for shard in _shards(store):
        ids = shard.ids()
        for start in range(0, len(ids), _SCAN):
            part = ids[start : start + _SCAN]
            for reference_id, reference in zip(part.tolist(), shard.references(part), strict=True):
                spans.setdefault(str(reference.doc_id), []).append((reference.start, reference_id))
    return {doc: [i for _, i in sorted(pairs)] for doc, pairs in spans.items()}


def _as_documents(replace: Mapping[str, str] | Sequence[Document]) -> list[Document]:
    if isinstance(replace, Mapping):
        return [Document(str(k), v) for k, v in replace.items()]
    documents = []
    for item in replace:
        if isinstance(item, Mapping):  # a JSONL row
            item = Document(str(item.get("id")), item.get("text"))  # type: ignore[arg-type]
        documents.append(Document(str(item[0]), item[1]))
    return documents


# ------------------------------------------------------------------------------ the journal
def _journal_state(folder: Path) -> str:
    """'clean', 'pending' (an uncommitted journal) or 'committed'."""
    if (folder / JOURNAL).is_dir():
        return "committed"
    if (folder / PENDING).is_dir():
        return "pending"
    return "clean"


def _roll_back(folder: Path) -> None:
    """Drop an uncommitted journal: nothing of it was applied."""
    pending = folder / PENDING
    if (pending / _DONE).is_file() and not (folder / _DONE).exists():
        os.replace(pending / _DONE, folder / _DONE)
    shutil.rmtree(pending)


def _check_no_journal(folder: Path) -> None:
    state = _journal_state(folder)
    if state == "pending":
        _roll_back(folder)
    elif state == "committed":
        raise UserError(
            f"{folder} has an interrupted edit ({JOURNAL}/): finish it first with "
            f"m3 edit {folder} --resume (or m3.bank.edit.resume_edit)"
        )


def _write_journal(
    folder: Path,
    plan: dict[str, Any],
    memory: SparseMemory | None,
    references: Sequence[Reference],
    embeddings: torch.Tensor | None,
) -> Path:
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
    os.replace(folder / _DONE, pending / _DONE)  # the bank reads as unfinished from here on
    os.replace(pending, folder / JOURNAL)  # the commit point
    return folder / JOURNAL


def _read_journal(
    journal: Path,
) -> tuple[dict[str, Any], SparseMemory | None, list[Reference], torch.Tensor | None]:
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


def _remove_from_index(index: MemoryIndex, ids: Sequence[int]) -> None:
    """Remove ids from an index, skipping those already gone (a resumed edit)."""
    if not ids:
        return
    try:
        index.remove(torch.tensor(list(ids), dtype=torch.long))
    except MissingReferenceError:
        for reference_id in ids:
            with contextlib.suppress(MissingReferenceError):
                index.remove(torch.tensor([reference_id], dtype=torch.long))


def _owners(ids: Sequence[int], held: Sequence[set[int]]) -> list[int]:
    """The shard each written id goes to: the one that holds it, else `id % shards`."""
    return [next((n for n, shard in enumerate(held) if i in shard), i % len(held)) for i in ids]


def _class(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _apply(folder: Path, index: MemoryIndex | None = None) -> EditSummary:
    """Apply the committed journal of `folder` (idempotent), then finish the edit."""
    from m3.backends.hdf5_store import HDF5Store

    journal = folder / JOURNAL
    plan, memory, references, embeddings = _read_journal(journal)
    manifest = plan["manifest"]
    written, removed = list(plan["written"]), list(plan["removed"])

    # 1. the store: deletes, then writes, each shard marked complete again
    files = [folder / s["file"] for s in manifest["shards"]]
    stores = [HDF5Store(path, mode="a") for path in files]
    try:
        held = [set(s.ids().tolist()) for s in stores]
        for store, ids in zip(stores, held, strict=True):
            gone = sorted(ids.intersection(removed))
            if gone:
                store.delete(gone)
        if written:
            if memory is None:
                raise UserError(f"{journal}: the journal lacks the memories it writes")
            owners = _owners(written, held)
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
        index = _class(manifest["index"]["class"]).load(current)
    _remove_from_index(index, removed)
    if written:
        index.add(embeddings, torch.tensor(written, dtype=torch.long))  # type: ignore[arg-type]
    index.build()
    index.save(new)
    os.replace(current, old)
    os.replace(new, current)
    shutil.rmtree(old)

    # 3. the manifest, atomically; then the bank is complete again
    tmp = folder / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / _MANIFEST)
    if (journal / _DONE).is_file():
        os.replace(journal / _DONE, folder / _DONE)
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
    state = _journal_state(folder)
    if state == "pending":
        _roll_back(folder)
    if state != "committed":
        return None
    return _apply(folder)


# ------------------------------------------------------------------------------ editing
def edit_bank(
    folder: str | Path,
    *,
    model: Memory3,
    tokenizer: Tokenizer,
    replace: Mapping[str, str] | Sequence[Document] = (),
    delete: Sequence[str] = (),
    chunker: Chunker | None = None,
    encoder: MemoryEncoder | None = None,
    sparsifier: nn.Module | None = None,
    batch_size: int = 64,
) -> EditSummary:
    """Replace or delete documents of a memory bank, updating its store and index together.

    Args:
        folder: A bank folder that `m3 build-memory` wrote (single-shard or sharded).
        model: The weights that wrote the bank (its `memory_fingerprint()` must be the
            store's); on any device.
        tokenizer: The bank's tokenizer (its fingerprint and reference prefix must be the
            store's).
        replace: New texts of existing documents: document id -> text, or `Document`s
            (also `{"id", "text"}` mappings, as read from JSONL).
        delete: Ids of documents to remove.
        chunker: Cuts new texts into references: the one that built the bank;
            `FixedChunker(model.config.reference_length)` (the build's default) when None.
        encoder: The memory encoder of the build; `MemoryEncoder()` when None.
        sparsifier: The sparsifier of the build; `TopKSparsifier(k=memory_tokens)` when None.
        batch_size: References per forward pass.

    Returns:
        What changed.

    Raises:
        UserError: For a folder without a finished bank or with an interrupted edit; a
            model or tokenizer that did not write the bank; an unknown document id, one
            named twice, empty text, or nothing to do (each naming the id).
    """
    from m3.bank.build import open_bank, read_knowledge
    from m3.memory.encoder import encode_references

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such bank folder")
    _check_no_journal(folder)
    documents = _as_documents(replace)
    deleted = [str(d) for d in delete]
    if not documents and not deleted:
        raise UserError("nothing to edit: give documents to replace or ids to delete")
    named: set[str] = set()
    for doc_id in [d.id for d in documents] + deleted:
        if doc_id in named:
            raise UserError(f"document {doc_id!r} is named twice in one edit")
        named.add(doc_id)
    for document in documents:
        if not isinstance(document.text, str) or not document.text.strip():
            raise UserError(f"document {document.id!r}: the new text is empty")

    bank = open_bank(folder)
    try:
        info = bank.store.info
        info.check_model(model.config.memory_shape, model.memory_fingerprint(), where=str(folder))
        if info.tokenizer_fingerprint and info.tokenizer_fingerprint != tokenizer.fingerprint():
            raise UserError(
                f"{folder} was written with tokenizer {info.tokenizer_fingerprint[:16]}, "
                f"this {type(tokenizer).__name__} has {tokenizer.fingerprint()[:16]}"
            )
        prefix = list(tokenizer.reference_prefix())
        if info.reference_prefix and list(info.reference_prefix) != prefix:
            raise UserError(
                f"{folder} was written with the reference prefix {list(info.reference_prefix)}, "
                f"the tokenizer's is {prefix}"
            )
        owned = document_references(bank.store)
        for doc_id in [d.id for d in documents] + deleted:
            if doc_id not in owned:
                raise UserError(f"document {doc_id!r} is not in the bank {folder}")
        shard_ids = [s.ids().numpy() for s in _shards(bank.store)]
        used = max((int(a.max()) + 1 for a in shard_ids if len(a)), default=0)
        next_id = max(int(bank.manifest.get("next_id", 0)), used)

        # cut the new texts as the build cut the knowledge base
        new_refs: list[Reference] = []
        if documents:
            chunker = chunker or FixedChunker(model.config.reference_length)
            cut = read_knowledge([_Documents(documents)], tokenizer, chunker=chunker).references
            by_doc: dict[str, list[Reference]] = {}
            for reference in cut:
                by_doc.setdefault(str(reference.doc_id), []).append(reference)
            for document in documents:
                if document.id not in by_doc:
                    raise UserError(f"document {document.id!r}: the new text has no tokens")
        written: list[int] = []
        removed: list[int] = [i for d in deleted for i in owned[d]]
        for document in documents:
            old, refs = owned[document.id], by_doc[document.id]
            if len(refs) == len(old):
                ids = old
            else:
                removed += old
                ids = list(range(next_id, next_id + len(refs)))
                next_id += len(refs)
            written += ids
            new_refs += refs

        memory = embeddings = None
        if new_refs:
            training = model.training
            try:
                with torch.no_grad():
                    memory = encode_references(
                        model.eval(), [r.ids for r in new_refs], prefix=prefix, encoder=encoder,
                        sparsifier=sparsifier, batch_size=batch_size,
                    ).to("cpu")  # fmt: skip
            finally:
                model.train(training)
            info.check_memory(memory, where=str(folder))
            embeddings = bank.embedder.embed([tokenizer.decode(r.ids) for r in new_refs])

        # the manifest after the edit
        manifest = json.loads(json.dumps(bank.manifest))
        held = [set(a.tolist()) for a in shard_ids]
        owners = _owners(written, held)
        for n, shard in enumerate(manifest["shards"]):
            ids = (
                held[n]
                .difference(removed)
                .union(i for i, owner in zip(written, owners, strict=True) if owner == n)
            )
            shard["references"] = len(ids)
        manifest["references"] = sum(s["references"] for s in manifest["shards"])
        manifest["next_id"] = next_id
        manifest.setdefault("edits", []).append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "replaced": [d.id for d in documents],
                "deleted": deleted,
                "written": sorted(written),
                "removed": sorted(removed),
            }
        )
        key_bytes, value_bytes = info.vector_bytes
        layers, _, heads, tokens, _ = info.memory_shape
        per_memory = layers * heads * tokens * (key_bytes + value_bytes)
        plan = {
            "replaced": [d.id for d in documents],
            "deleted": deleted,
            "written": written,
            "removed": removed,
            "bytes_written": per_memory * len(written),
            "manifest": manifest,
        }
        index = bank.index
    finally:
        bank.store.close()
    _write_journal(folder, plan, memory, new_refs, embeddings)
    return _apply(folder, index)


# ------------------------------------------------------------------------------ from a recipe
def _resolve(source: Recipe | str | Path, overrides: Sequence[str]) -> tuple[Recipe, Path]:
    from m3.recipes import Recipe, load_recipe

    bank: Path | None = None
    if isinstance(source, Recipe):
        if overrides:
            raise UserError("overrides apply to a recipe file or a bank folder, not a recipe")
        recipe = source
    else:
        path = Path(source)
        if path.is_dir():
            if not (path / "recipe.yaml").is_file() or not (path / _MANIFEST).is_file():
                raise UserError(f"{path} is not a memory bank folder (no recipe.yaml/manifest)")
            recipe, bank = load_recipe(path / "recipe.yaml", overrides), path
        elif path.is_file():
            recipe = load_recipe(path, overrides)
        else:
            raise UserError(f"{path}: no such recipe file or bank folder")
    if bank is None:
        if recipe.retrieval is not None and recipe.retrieval.bank is not None:
            bank = Path(recipe.retrieval.bank)
        elif recipe.stage == "build_memory":
            bank = Path(recipe.output)
        else:
            raise UserError("retrieval.bank: name the memory bank folder to edit")
    if not bank.is_dir():
        raise UserError(f"retrieval.bank: {bank} does not exist (run m3 build-memory first?)")
    return recipe, bank


def resolve_bank(source: Recipe | str | Path, overrides: Sequence[str] = ()) -> Path:
    """The bank folder a recipe or folder names (as `edit_from_recipe` finds it).

    Args:
        source: A checked recipe, a recipe file, or a bank folder.
        overrides: `key=value` overrides for a recipe file or the folder's recipe.

    Returns:
        The bank folder.

    Raises:
        UserError: When no bank is named or the folder does not exist.
    """
    return _resolve(source, overrides)[1]


def edit_from_recipe(
    source: Recipe | str | Path,
    *,
    overrides: Sequence[str] = (),
    replace: Mapping[str, str] | Sequence[Document] = (),
    delete: Sequence[str] = (),
    batch_size: int | None = None,
) -> EditSummary:
    """Edit the bank a recipe names, with the recipe's weights, tokenizer and chunker.

    The bank is a bank folder given as `source` (its `recipe.yaml` is the recipe), else the
    recipe's `retrieval.bank`, else the `output` of a `build_memory` recipe. The weights are
    `training.init_weights`, else those that wrote the bank (its `recipe.yaml`'s); the
    tokenizer, chunker, encoder and sparsifier are the recipe's, as in `m3 build-memory`.

    Args:
        source: A checked recipe, a recipe file, or a bank folder.
        overrides: `key=value` overrides for a recipe file or the folder's recipe.
        replace: New texts of documents (see `edit_bank`).
        delete: Ids of documents to remove.
        batch_size: References per forward pass; the recipe's `bank.batch_size` (64) when
            None.

    Returns:
        What changed.

    Raises:
        UserError: For a recipe without a bank, weights or tokenizer, missing files, or
            any error of `edit_bank`.
    """
    from m3.model.checkpoints import load_weights
    from m3.model.memory3 import Memory3
    from m3.recipes import build, build_tokenizer

    recipe, bank = _resolve(source, overrides)
    if recipe.tokenizer is None:
        raise UserError("tokenizer: editing a bank needs the tokenizer that wrote it")
    weights = recipe.training.init_weights
    if weights is None and (bank / "recipe.yaml").is_file():  # the weights that wrote it
        from m3.core.registry import input_files_unchecked
        from m3.recipes import load_recipe

        with input_files_unchecked():
            weights = load_recipe(bank / "recipe.yaml").training.init_weights
    if weights is None:
        raise UserError("training.init_weights: name the weights that wrote the bank")
    weights_path = Path(weights)
    if weights_path.is_dir() and (weights_path / "model.pt").is_file():
        weights_path = weights_path / "model.pt"
    if not weights_path.exists():
        raise UserError(f"training.init_weights: {weights_path} does not exist")
    config = recipe.model.config()
    model = Memory3(config)
    load_weights(model, weights_path)
    tokenizer = build_tokenizer(recipe)
    chunker = build(recipe, "chunker") if recipe.chunker else None
    encoder = build(recipe, "encoder") if recipe.encoder else None
    sparsifier = build(recipe, "sparsifier") if recipe.sparsifier else None
    if batch_size is None:
        batch_size = recipe.bank.batch_size if getattr(recipe, "bank", None) else 64
    return edit_bank(
        bank, model=model, tokenizer=tokenizer, replace=replace, delete=delete,
        chunker=chunker, encoder=encoder, sparsifier=sparsifier, batch_size=batch_size,
    )  # fmt: skip


def read_replacements(path: str | Path) -> list[Document]:
    """Read replacement documents from a JSON Lines file of `{"id", "text"}` lines.

    Args:
        path: The file (e.g. a knowledge base's `kb.jsonl` with edited lines).

    Returns:
        The documents, in file order.

    Raises:
        UserError: For a missing file, a line that is not JSON, or one without `id` or a
            string `text` (naming the file and line).
    """
    rows = read_jsonl(path, ("id", "text"), text_keys=("text",))
    return [Document(str(row["id"]), row["text"]) for row in rows]


# ------------------------------------------------------------------------------ measuring edits
@dataclass(frozen=True)
class EditReport:
    """How well edits took effect: cloze accuracy on the edits' questions, with memory.

    Each question's correct option is the new value (the old one is among the others), so
    accuracy is the share of questions answered with the new value.

    Attributes:
        took_effect: Share answered with the new value after the edits.
        before: Share answered with the new value before them (the baseline).
        n: Questions (edits).
        after_score: The full score after (with its 95% interval and chance level).
        before_score: The full score before.
        summary: What the edits changed in the bank.
        bank: The edited copy of the bank.
    """

    took_effect: float
    before: float
    n: int
    after_score: ClozeScore
    before_score: ClozeScore
    summary: EditSummary
    bank: Path


def _cloze(
    folder: Path,
    model: Memory3,
    tokenizer: Tokenizer,
    questions: Sequence[Any],
    *,
    k: int,
    threshold: float | None,
) -> ClozeScore:
    from m3.bank.build import open_bank
    from m3.inference.evaluate import evaluate_cloze
    from m3.retrieval.retriever import Retriever

    bank = open_bank(folder)
    retriever = Retriever(
        embedder=bank.embedder, index=bank.index, store=bank.store, tokenizer=tokenizer,
        model=model, k=k, threshold=threshold, chunk_length=model.config.chunk_length,
        expected_embedder_fingerprint=str(bank.manifest["embedder"]["fingerprint"]),
        where=str(folder),
    )  # fmt: skip
    try:
        return evaluate_cloze(model, tokenizer, questions, retriever=retriever, modes=("memory",))[
            "memory"
        ]
    finally:
        retriever.close()
        bank.store.close()


def measure_edits(
    bank_folder: str | Path,
    edits: Sequence[Edit],
    *,
    model: Memory3,
    tokenizer: Tokenizer,
    work_dir: str | Path,
    k: int = 5,
    threshold: float | None = 2 / 3,
    chunker: Chunker | None = None,
    encoder: MemoryEncoder | None = None,
    sparsifier: nn.Module | None = None,
) -> EditReport:
    """Apply knowledge edits to a copy of a bank and measure whether the answers follow.

    The bank is copied to `work_dir/edited-bank` (the original stays as it is, e.g. for
    other evaluations); every edit's documents replace theirs in the copy. Each edit's
    cloze question is asked with memory before (original bank) and after (the copy).

    Args:
        bank_folder: The bank (its knowledge base holds the edited documents).
        edits: The edits (`World.edits(n)` or `m3.data.world.read_edits`).
        model: The weights that wrote the bank.
        tokenizer: The bank's tokenizer.
        work_dir: Where the edited copy goes (created if needed; an old copy is replaced).
        k: Memories per chunk.
        threshold: Leakage threshold of the retriever (None: off).
        chunker: Cuts the new texts (see `edit_bank`).
        encoder: The memory encoder (see `edit_bank`).
        sparsifier: The sparsifier (see `edit_bank`).

    Returns:
        The share of questions answered with the new value after and before.

    Raises:
        UserError: For no edits, or any error of `edit_bank`.
    """
    if not edits:
        raise UserError("no edits to measure")
    source = Path(bank_folder)
    questions = [e.question for e in edits]
    before = _cloze(source, model, tokenizer, questions, k=k, threshold=threshold)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "edited-bank"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(source, copy)
    summary = edit_bank(
        copy, model=model, tokenizer=tokenizer,
        replace=[d for e in edits for d in e.documents],
        chunker=chunker, encoder=encoder, sparsifier=sparsifier,
    )  # fmt: skip
    after = _cloze(copy, model, tokenizer, questions, k=k, threshold=threshold)
    return EditReport(
        took_effect=after.accuracy, before=before.accuracy, n=len(edits),
        after_score=after, before_score=before, summary=summary, bank=copy,
    )  # fmt: skip


__all__ = [
    "JOURNAL",
    "EditReport",
    "EditSummary",
    "document_references",
    "edit_bank",
    "edit_from_recipe",
    "measure_edits",
    "read_replacements",
    "resolve_bank",
    "resume_edit",
]
