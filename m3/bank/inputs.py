"""What a bank was built from, and whether a bank folder is still whole and up to date.

A bank's memories depend on more than its recipe: on the knowledge base's text, the
tokenizer's files and the weights, which can all change in place under the same paths. A
build therefore records their fingerprints (`BuildInputs`): in every shard's `info.extra`,
so that a resumed build refuses shards of other inputs, and in `manifest.json`, so that
"complete" means complete for these inputs. `bank_problems` lists, in words, every reason a
finished folder is not the bank the inputs would build: inputs that changed (a rebuild,
`--overwrite`) and outputs that are missing or damaged (a resume rebuilds them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3.backends.base import CorruptReferenceError
from m3.backends.hdf5_salvage import interrupted_writer, marker_path
from m3.backends.hdf5_store import HDF5Store
from m3.bank.layout import MANIFEST, QUANTIZER, index_path, layered_edits
from m3.core.errors import UserError
from m3.core.references import Reference


def knowledge_fingerprint(references: Sequence[Reference]) -> str:
    """A sha256 digest of every reference's provenance and token ids, in id order.

    Args:
        references: The knowledge base's references (id = position).

    Returns:
        The hex digest: equal exactly when the references are.
    """
    digest = hashlib.sha256()
    for doc_id, start, end, ids in references:
        digest.update(f"{type(doc_id).__name__}\0{doc_id}\0{start}\0{end}\0{len(ids)}\0".encode())
        digest.update(np.asarray(ids, dtype="<i4").tobytes())  # as the store keeps them
    return digest.hexdigest()


@dataclass(frozen=True)
class BuildInputs:
    """The fingerprints of what a bank's memories are computed from.

    Attributes:
        knowledge: `knowledge_fingerprint` of the references.
        tokenizer: The tokenizer's `fingerprint()`.
        model: The weights' `memory_fingerprint()`.
    """

    knowledge: str
    tokenizer: str
    model: str

    def to_dict(self) -> dict[str, str]:
        """The fingerprints by name (what `manifest.json` records as `built_from`)."""
        return asdict(self)

    def differences(self, recorded: dict[str, Any], where: str) -> list[str]:
        """What differs from fingerprints recorded earlier, in words.

        Args:
            recorded: A `to_dict()` read back (keys it lacks are not compared: a bank built
                before they were recorded).
            where: What recorded them, for the messages.

        Returns:
            One sentence per differing input; empty when all agree.
        """
        names = {"knowledge": "the knowledge base", "tokenizer": "the tokenizer",
                 "model": "the weights (training.init_weights)"}  # fmt: skip
        return [
            f"{names[key]} changed since {where} was built ({str(recorded[key])[:12]}, now "
            f"{value[:12]})"
            for key, value in self.to_dict().items()
            if key in recorded and recorded[key] != value
        ]


def read_manifest(folder: Path) -> dict[str, Any]:
    """A bank's `manifest.json`.

    Args:
        folder: The bank folder.

    Returns:
        The manifest.

    Raises:
        UserError: When it is missing or is not a bank manifest.
    """
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        for shard in manifest["shards"]:  # every shard names its file
            str(shard["file"])
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a bank manifest ({error!r})") from None
    return manifest


def open_shard(path: Path) -> tuple[int, bool] | str:
    """Open a shard file to count it.

    Args:
        path: The shard.

    Returns:
        `(references, complete)`, or why the file cannot be opened as a store.
    """
    try:
        store = HDF5Store(path, mode="r", allow_incomplete=True)
        try:
            return len(store), store.complete
        finally:
            store.close()
    except (UserError, CorruptReferenceError, OSError) as error:
        return str(error)


def shard_problem(path: Path, references: int | None = None) -> str | None:
    """Why a shard file cannot serve, in words; None when it is whole.

    Args:
        path: The shard.
        references: How many references the manifest says it holds; None not to compare.

    Returns:
        A sentence naming the file, or None.
    """
    if not path.is_file():
        return f"{path.name} is missing"
    if interrupted_writer(path) is not None:
        return f"{path.name} was being written when its writer stopped ({marker_path(path).name})"
    opened = open_shard(path)
    if isinstance(opened, str):
        return f"{path.name} cannot be opened ({opened})"
    count, complete = opened
    if not complete:
        return f"{path.name} is incomplete"
    if references is not None and count != references:
        return f"{path.name} holds {count} references, the manifest says {references}"
    return None


def bank_problems(folder: Path, inputs: BuildInputs | None = None) -> tuple[list[str], list[str]]:
    """Every reason a finished bank folder is not whole, or not the bank of these inputs.

    Args:
        folder: The bank folder.
        inputs: The fingerprints the bank should have been built from; None to check only
            that its files are whole.

    Returns:
        `(changed, damaged)`: sentences naming the inputs that differ from the manifest's,
        and the files that are missing or damaged. Both empty for a sound bank.
    """
    try:
        manifest = read_manifest(folder)
    except UserError as error:
        return [], [str(error)]
    changed = [] if inputs is None else inputs.differences(
        manifest.get("built_from") or {"model": manifest.get("model_fingerprint"),
                                       "tokenizer": manifest.get("tokenizer_fingerprint")},
        folder.name,
    )  # fmt: skip
    damaged = []
    for shard in manifest["shards"]:
        problem = shard_problem(folder / shard["file"], shard.get("references"))
        if problem is not None:
            damaged.append(problem)
    for edit in layered_edits(manifest):
        problem = shard_problem(folder / edit["layer"], len(edit["written"]))
        if problem is not None:
            damaged.append(f"the layer of an edit: {problem}")
    index = folder / index_path(manifest)
    if not index.is_dir() or not any(index.iterdir()):
        damaged.append(f"{index.name}/ is missing or empty")
    if "embedder" in manifest.get("saved", []) and not (folder / "embedder").is_dir():
        damaged.append("embedder/ is missing")
    if manifest.get("quantizer") is not None and not (folder / QUANTIZER).is_file():
        damaged.append(f"{QUANTIZER} is missing")
    from m3.bank.vectors import bank_embeddings  # the embedding shards (checked cheaply)

    shards = bank_embeddings(folder, manifest)
    if isinstance(shards, str):
        damaged.append(shards)
    elif shards is not None:
        damaged += shards.problems().values()
    return changed, damaged
