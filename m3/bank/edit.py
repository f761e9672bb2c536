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
counts and an entry per edit in `manifest["edits"]`.

An edit is made atomic and resumable by a redo journal (`m3.bank.journal`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from m3.backends.base import MemoryStore
from m3.backends.sharded import shards_of
from m3.bank.journal import (
    JOURNAL,
    EditSummary,
    apply_journal,
    check_no_journal,
    edit_lock,
    open_for_edit,
    resume_edit,
    shard_owners,
    write_journal,
)
from m3.bank.layout import MANIFEST
from m3.core import registry
from m3.core.errors import UserError
from m3.data.chunking import Chunker, Reference
from m3.data.documents import Document, read_jsonl
from m3.data.sources import TextSource
from m3.recipes.defaults import default_spec

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.memory.encoder import MemoryEncoder
    from m3.model.memory3 import Memory3
    from m3.recipes import Recipe


#: References whose provenance is read at a time when mapping documents to references.
_SCAN = 65536


# ------------------------------------------------------------------------------ reading a bank
class _Documents(TextSource):
    """Given documents as a source, so that `read_knowledge` cuts them."""

    def __init__(self, documents: Sequence[Document]) -> None:
        self._documents = list(documents)

    def documents(self) -> list[Document]:
        return list(self._documents)

    def describe(self) -> str:
        return f"{len(self._documents)} replacement documents"


def document_references(store: MemoryStore) -> dict[str, list[int]]:
    """Which references each document gave: document id -> reference ids.

    Args:
        store: A bank's store (an `HDF5Store` or a `ShardedStore`).

    Returns:
        Document id (as a string) -> its reference ids, in the order of their spans.
    """
    spans: dict[str, list[tuple[int, int]]] = {}
    for shard in shards_of(store):
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
            the default (`m3.recipes.defaults`: the build's) when None.
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
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such bank folder")
    with edit_lock(folder):
        return _edit_locked(
            folder, model=model, tokenizer=tokenizer, replace=replace, delete=delete,
            chunker=chunker, encoder=encoder, sparsifier=sparsifier, batch_size=batch_size,
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
        shard_ids = [s.ids().numpy() for s in shards_of(bank.store)]
        used = max((int(a.max()) + 1 for a in shard_ids if len(a)), default=0)
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

        # the manifest after the edit
        manifest = json.loads(json.dumps(bank.manifest))
        held = [set(a.tolist()) for a in shard_ids]
        owners = shard_owners(written, held)
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
    stores = open_for_edit(folder, plan["manifest"])  # before the commit point: or nothing changes
    try:
        write_journal(folder, plan, memory, new_refs, embeddings)
    except BaseException:
        for store in stores:
            store.close()
        raise
    return apply_journal(folder, index, stores)


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
