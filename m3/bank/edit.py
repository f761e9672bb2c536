"""Knowledge editing: replace or delete documents of a memory bank without retraining.

A bank's references carry the id of the knowledge-base document they were cut from
(`Reference.doc_id`), so a document is addressed by that id (e.g. `person-0007.1`).
Replacing a document cuts its new text exactly as `m3 build-memory` cut the knowledge base
(`m3.bank.knowledge.read_knowledge` with the bank's chunker), encodes the new references with the
model that wrote the bank (its fingerprint must be the store's), and writes their memories
and token ids to the store: under the document's old reference ids when it gives as many
references as before, else the old ids are deleted and the new references get ids above
every id the bank has used (`manifest["next_id"]`). The index drops the old embeddings and
gains the new ones, embedded with the bank's own saved embedder (not refitted). Deleting a
document removes its references from the store and the index. The manifest records the new
counts and an entry per edit in `manifest["edits"]`. The named documents' references are
found in the bank's reference table (`m3.bank.table`: its spans, no token read) plus the
layers of earlier edits (`document_references`); a bank built before the table existed is
scanned through its shards, as before.

An edit changes no file of the bank that a reader may hold: it writes the new memories to a
layer of their own and the index to a new folder, then commits by one atomic replace of the
manifest (`m3.bank.layers`). Readers that opened the bank before keep reading the bank they
opened; an edit stopped before its commit leaves the bank as it was.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from m3.backends.base import MemoryStore
from m3.bank.journal import JOURNAL, apply_journal, check_no_journal, journal_state, roll_back
from m3.bank.layers import (
    collect_garbage,
    commit,
    edit_lock,
    layer_names,
    remove_from_index,
    save_index,
    write_layer,
)
from m3.bank.layout import MANIFEST, layered_edits
from m3.core import registry
from m3.core.errors import UserError
from m3.data.chunking import Chunker, Reference
from m3.data.documents import MAX_DOCUMENT_BYTES, Document, check_document_size, read_jsonl
from m3.data.sources import TextSource
from m3.recipes.defaults import default_spec

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.memory.encoder import MemoryEncoder
    from m3.model.memory3 import Memory3
    from m3.recipes import Recipe


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
        store_bytes: Bytes of the store after the edit: its shard files and edit layers.
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


def document_references(
    store: MemoryStore, documents: Collection[str] | None = None
) -> dict[str, list[int]]:
    """Which references each document gave: document id -> reference ids.

    With `documents` named and a bank opened with its reference table (`m3.bank.open`), the
    table's spans find their references without reading any other reference; the ids that
    edits wrote are read from their layers. Otherwise every served reference's provenance is
    read (from the table when there is one, else from the shards).

    Args:
        store: A bank's store (as `open_bank` gives it: edits included).
        documents: Only these documents (ids as strings); None: every document.

    Returns:
        Document id (as a string) -> its reference ids, in the order of their spans; a
        named document the bank does not hold is absent.
    """
    ids = store.ids().numpy()
    wanted = None if documents is None else {str(d) for d in documents}
    table = getattr(store, "table", None)
    if wanted is not None and table is not None and hasattr(table, "document_rows"):
        tabled = store.table_ids()  # type: ignore[attr-defined]
        found = table.document_rows(wanted)
        at = np.minimum(np.searchsorted(tabled, found), max(len(tabled) - 1, 0))
        found = found[tabled[at] == found] if len(tabled) else found[:0]  # removed, rewritten
        layered = np.ones(len(ids), dtype=bool)  # what edits wrote (tabled ⊆ ids, both sorted)
        layered[np.searchsorted(ids, tabled)] = False
        ids = np.union1d(found, ids[layered])
    spans: dict[str, list[tuple[int, int]]] = {}
    for start in range(0, len(ids), _SCAN):
        part = torch.from_numpy(ids[start : start + _SCAN])
        for reference_id, reference in zip(part.tolist(), store.references(part), strict=True):
            doc = str(reference.doc_id)
            if wanted is None or doc in wanted:
                spans.setdefault(doc, []).append((reference.start, reference_id))
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
    max_document_bytes: int = MAX_DOCUMENT_BYTES,
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
            the default (`m3.recipes.defaults`: the build's) when None.
        encoder: The memory encoder of the build; `MemoryEncoder()` when None.
        sparsifier: The sparsifier of the build; `TopKSparsifier(k=memory_tokens)` when None.
        batch_size: References per forward pass.
        max_document_bytes: Most bytes of UTF-8 text a new text may hold (as a knowledge
            base's `files` source allows by default).

    Returns:
        What changed.

    Raises:
        UserError: For a folder without a finished bank or with an interrupted edit; a
            model or tokenizer that did not write the bank; an unknown document id, one
            named twice, empty text, text over `max_document_bytes`, or nothing to do
            (each naming the id).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such bank folder")
    with edit_lock(folder):
        return _edit_locked(
            folder, model=model, tokenizer=tokenizer, replace=replace, delete=delete,
            chunker=chunker, encoder=encoder, sparsifier=sparsifier, batch_size=batch_size,
            max_document_bytes=max_document_bytes,
        )  # fmt: skip


def _edit_locked(
    folder: Path,
    *,
    model: Memory3,
    tokenizer: Tokenizer,
    replace: Mapping[str, str] | Sequence[Document],
    delete: Sequence[str],
    chunker: Chunker | None,
    encoder: MemoryEncoder | None,
    sparsifier: nn.Module | None,
    batch_size: int,
    max_document_bytes: int,
) -> EditSummary:
    """`edit_bank`, holding the bank's edit lock."""
    from m3.bank.knowledge import read_knowledge
    from m3.bank.open import open_bank
    from m3.memory.encoder import encode_references

    check_no_journal(folder)
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
        check_document_size(
            "the edit", document.id, document.text, max_document_bytes,
            raise_limit="edit_bank(max_document_bytes=N)",
        )  # fmt: skip

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
        owned = document_references(bank.store, named)  # from the table when it has one
        for doc_id in [d.id for d in documents] + deleted:
            if doc_id not in owned:
                raise UserError(f"document {doc_id!r} is not in the bank {folder}")
        collect_garbage(folder, bank.manifest)  # what an edit stopped before its commit left
        served = bank.store.ids().numpy()
        used = int(served.max()) + 1 if len(served) else 0
        next_id = max(int(bank.manifest.get("next_id", 0)), used)

        # cut the new texts as the build cut the knowledge base
        new_refs: list[Reference] = []
        if documents:
            chunker = chunker or registry.instantiate(
                "chunker", default_spec("chunker", model.config)
            )
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

        # the new layer and index, then the manifest that names them: the commit point
        number = len(bank.manifest.get("edits", [])) + 1
        layer, index_name = layer_names(number)
        layer_info = dataclasses.replace(info, extra={"edit": number})
        write_layer(folder, layer, layer_info, bank.store, written, memory, new_refs)
        index = bank.index
        remove_from_index(index, removed)
        if written:
            index.add(embeddings, torch.tensor(written, dtype=torch.long))  # type: ignore[arg-type]
        index.build()
        save_index(folder, index_name, index)
        manifest = json.loads(json.dumps(bank.manifest))
        manifest["references"] = int(np.union1d(np.setdiff1d(served, removed), written).size)
        manifest["next_id"] = next_id
        manifest["index"] = {**manifest["index"], "path": index_name}
        manifest.setdefault("edits", []).append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "replaced": [d.id for d in documents],
                "deleted": deleted,
                "written": sorted(written),
                "removed": sorted(removed),
                "layer": layer,
            }
        )
    finally:
        bank.store.close()
    commit(folder, manifest)
    collect_garbage(folder, manifest)  # the index this edit replaced
    key_bytes, value_bytes = info.vector_bytes
    n_layers, _, heads, tokens, _ = info.memory_shape
    files = [s["file"] for s in manifest["shards"]] + [e["layer"] for e in layered_edits(manifest)]
    return EditSummary(
        bank=folder,
        documents_replaced=len(documents),
        documents_deleted=len(deleted),
        references_written=len(written),
        references_removed=len(removed),
        references=manifest["references"],
        bytes_written=n_layers * heads * tokens * (key_bytes + value_bytes) * len(written),
        store_bytes=sum((folder / f).stat().st_size for f in files),
        written_ids=tuple(sorted(written)),
        removed_ids=tuple(sorted(removed)),
    )


def resume_edit(folder: str | Path) -> EditSummary | None:
    """Clear what an interrupted edit left, or finish an earlier m3's interrupted edit.

    An edit stopped before its commit left the bank as it was: its unlisted files are
    deleted. An earlier m3's edit (which changed the shards in place) left a redo journal:
    a committed one is applied (`m3.bank.journal`; no model needed), an uncommitted one
    rolled back.

    Args:
        folder: The bank folder.

    Returns:
        The finished journal's summary; None when no journal was committed.

    Raises:
        UserError: When another process is editing the bank.
    """
    from m3.bank.inputs import read_manifest

    folder = Path(folder)
    with edit_lock(folder):
        state = journal_state(folder)
        if state == "pending":
            roll_back(folder)
        if state == "committed":
            return apply_journal(folder)
        if (folder / MANIFEST).is_file():
            collect_garbage(folder, read_manifest(folder))
        return None


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
            if not (path / "recipe.yaml").is_file() or not (path / MANIFEST).is_file():
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
    chunker, encoder = build(recipe, "chunker"), build(recipe, "encoder")
    sparsifier = build(recipe, "sparsifier")
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


__all__ = [
    "JOURNAL",
    "EditSummary",
    "document_references",
    "edit_bank",
    "edit_from_recipe",
    "read_replacements",
    "resolve_bank",
    "resume_edit",
]
