"""The reference table: every reference's token ids and provenance on disk, read by id.

`m3 build-memory` first cuts the knowledge base into references (`m3.bank.knowledge`: the
documents of the sources in order, each cut by the chunker, a reference's id its position)
and writes them to `<bank>/references/` instead of holding them as Python lists: at the
paper's scale (1.1×10⁸ references of up to 128 tokens) those lists alone would be tens of
GB. Every stage after it reads references by id from memory-mapped arrays.

The format is plain NumPy arrays, one folder per shard of `DOCUMENTS_PER_SHARD` documents:

| file | what |
|---|---|
| `tokens.npy` | every reference's token ids, one after another, int32 |
| `offsets.npy` | where each reference's tokens start in `tokens.npy` (and the end), int64 |
| `spans.npy` | per reference: its document's row in `documents.json`, its start and end, int64 |
| `documents.json` | the ids of the shard's documents that gave references (strings or integers) |

`np.load(mmap_mode="r")` maps them without reading: a reference costs two offset reads
and one slice, from any process, with no library beyond NumPy and no server; the files are
written once and never changed. (Arrow/Parquet would add row groups and decompression to
every random read, for no gain here.)

Shards are written independently and each is made visible by one rename, so several
processes (the ranks of a build, each starting at its own shard) can write a table
together, and a killed writer leaves only a temporary folder that the next one discards.
The table's `manifest.json`, written last, records the shards, the counts, the digest of
the documents it was cut from (`documents_fingerprint`) and the knowledge fingerprint
(`m3.bank.inputs.knowledge_fingerprint`, the same digest a bank records), computed in one
streaming pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from m3.bank.inputs import knowledge_fingerprint
from m3.core.errors import UserError
from m3.core.references import Reference
from m3.core.runs import process_alive
from m3.data.chunking import Chunker, iter_references

if TYPE_CHECKING:
    from m3.data.documents import Document
    from m3.data.tokenizer import Tokenizer

#: Documents per shard of a reference table.
DOCUMENTS_PER_SHARD = 65536
#: The table's manifest, written last.
TABLE_MANIFEST = "manifest.json"


def documents_fingerprint(
    documents: Iterable[Document], tokenizer: Tokenizer, chunker: Chunker
) -> str:
    """A sha256 digest of what a table is cut from: every document, the tokenizer, the chunker.

    Cheap next to tokenizing (it hashes the texts' bytes, streamed), so that a build can
    tell whether a table on disk is the one these inputs would write.

    Args:
        documents: The knowledge base's documents, in order (one pass).
        tokenizer: The tokenizer that cuts them.
        chunker: The chunker that cuts them.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256(f"{tokenizer.fingerprint()}\0{chunker!r}\0".encode())
    for document in documents:
        digest.update(f"{type(document.id).__name__}\0{document.id}\0".encode())
        digest.update(document.text.encode("utf-8", errors="surrogatepass") + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class _Shard:
    """One shard's arrays, memory-mapped (as plain read-only arrays: slicing them is cheap)."""

    tokens: np.ndarray
    offsets: np.ndarray
    spans: np.ndarray
    documents: list[Any]

    @classmethod
    def open(cls, path: Path) -> _Shard:
        def mapped(name: str) -> np.ndarray:
            # a view as np.ndarray: slicing a np.memmap costs ~4x more, for nothing here
            return np.load(path / name, mmap_mode="r").view(np.ndarray)

        return cls(
            mapped("tokens.npy"),
            mapped("offsets.npy"),
            mapped("spans.npy"),
            json.loads((path / "documents.json").read_text()),
        )


class ReferenceTable(Sequence[Reference]):
    """A written reference table, read by id: `table[i]` is reference `i`.

    Args:
        folder: The table's folder (`write_table` wrote it).

    Raises:
        UserError: For a folder without a finished table, or a shard that is missing.
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / TABLE_MANIFEST
        try:
            manifest = json.loads(path.read_text())
            names = [str(s["name"]) for s in manifest["shards"]]
        except FileNotFoundError:
            raise UserError(f"{folder} holds no finished reference table") from None
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is not a reference table manifest ({error!r})") from None
        try:
            shards = [_Shard.open(folder / name) for name in names]
        except (OSError, ValueError) as error:
            raise UserError(
                f"{folder}: a shard of the reference table is damaged ({error})"
            ) from None
        self._set(folder, manifest, shards)

    def _set(self, folder: Path, manifest: dict[str, Any], shards: list[_Shard]) -> None:
        self.folder, self.manifest, self._shards = folder, manifest, shards
        counts = [len(s.offsets) - 1 for s in shards]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def _of(cls, folder: Path, manifest: dict[str, Any], shards: list[_Shard]) -> ReferenceTable:
        """A table of open shards, before a manifest on disk names them."""
        table = cls.__new__(cls)
        table._set(folder, manifest, shards)
        return table

    @property
    def knowledge(self) -> str:
        """The knowledge fingerprint of the references (`m3.bank.inputs.knowledge_fingerprint`)."""
        return str(self.manifest["knowledge"])

    @property
    def documents(self) -> int:
        """Documents that gave at least one reference."""
        return int(self.manifest["documents"])

    @property
    def skipped(self) -> int:
        """Documents left out: empty, whitespace-only or tokenizing to nothing."""
        return int(self.manifest["skipped"])

    def __len__(self) -> int:
        return int(self._first[-1])

    @overload
    def __getitem__(self, index: int) -> Reference: ...

    @overload
    def __getitem__(self, index: slice) -> list[Reference]: ...

    def __getitem__(self, index: int | slice) -> Reference | list[Reference]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"reference {index} is not in the table of {len(self)}")
        index %= len(self)
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        part, row = self._shards[shard], index - int(self._first[shard])
        start, end = int(part.offsets[row]), int(part.offsets[row + 1])
        document, span_start, span_end = part.spans[row].tolist()
        ids = tuple(part.tokens[start:end].tolist())
        return Reference(part.documents[document], span_start, span_end, ids)

    def lengths(self) -> np.ndarray:
        """Tokens per reference, `(N,)` int64, in id order."""
        return np.concatenate([np.diff(s.offsets) for s in self._shards]).astype(np.int64)

    def _locate(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard and row of each id; an id outside the table is named."""
        array = np.asarray(ids, dtype=np.int64).reshape(-1)
        if array.size and (int(array.min()) < 0 or int(array.max()) >= len(self)):
            bad = array[(array < 0) | (array >= len(self))][0]
            raise IndexError(f"reference {int(bad)} is not in the table of {len(self)}")
        shard = np.searchsorted(self._first, array, side="right") - 1
        return shard, array - self._first[shard]

    def tokens(self, ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The token ids of references by id, without building `Reference`s.

        The leakage filter's read (`m3.retrieval.retriever.Retriever`): two offset reads
        and one slice of the mapped file per id.

        Args:
            ids: `(N,)` reference ids, repeats allowed.

        Returns:
            One `(L_i,)` int32 array per id, in order: read-only views of the mapped file.

        Raises:
            IndexError: For an id outside the table.
        """
        shards, rows = self._locate(ids)
        out = []
        for shard, row in zip(shards.tolist(), rows.tolist(), strict=True):
            part = self._shards[shard]
            out.append(part.tokens[part.offsets[row] : part.offsets[row + 1]])
        return out

    def document_rows(self, documents: Collection[str]) -> np.ndarray:
        """The ids of the references cut from some documents, found without reading tokens.

        Args:
            documents: Document ids, compared as strings (`str(doc_id)`, as `m3 edit`
                names documents).

        Returns:
            `(M,)` int64 reference ids, ascending.
        """
        wanted = {str(d) for d in documents}
        found = []
        for first, part in zip(self._first.tolist(), self._shards, strict=False):
            rows = [n for n, doc in enumerate(part.documents) if str(doc) in wanted]
            if rows:
                found.append(first + np.flatnonzero(np.isin(part.spans[:, 0], rows)))
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[Reference]:
        for index in range(len(self)):
            yield self[index]

    def __reduce__(self) -> tuple[Any, ...]:
        # reopened by folder in the receiving process: pickling the mapped arrays would copy them
        return (ReferenceTable, (self.folder,))


def write_table(
    folder: str | Path,
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    chunker: Chunker,
    skipped: int = 0,
    rank: int = 0,
    world: int = 1,
    documents_per_shard: int = DOCUMENTS_PER_SHARD,
    digest: str | None = None,
    count: int | None = None,
) -> ReferenceTable:
    """Write the reference table of a knowledge base (or finish one), and open it.

    A finished table of the same documents, tokenizer and chunker is kept as it is; one of
    other inputs is replaced. Shards another writer finished are kept; this writer starts at
    shard `rank` and takes every `world`-th, then any still missing. The documents are
    streamed: one pass writes this writer's shards, another (only when some are still
    missing then) the rest; none holds more than one document's tokens at a time beyond the
    shard being written.

    Args:
        folder: The table's folder (created).
        documents: The knowledge base's documents, in order (`m3.bank.knowledge`): a list,
            or anything that streams them anew each time it is iterated
            (`KnowledgeDocuments`).
        tokenizer: Tokenizes them.
        chunker: Cuts each into references.
        skipped: Documents the reading already left out (empty), for the counts.
        rank: This writer's rank.
        world: Writers working on the table at once.
        documents_per_shard: Documents per shard.
        digest: `documents_fingerprint` of the documents, when the caller computed it
            already (`KnowledgeDocuments.check`); computed here (one pass) when None.
        count: How many documents there are; `len(documents)` when None.

    Returns:
        The table.
    """
    folder = Path(folder)
    if digest is None:
        digest = documents_fingerprint(documents, tokenizer, chunker)
    if count is None:
        count = len(documents)  # type: ignore[arg-type]
    if (folder / TABLE_MANIFEST).is_file():
        try:
            table = ReferenceTable(folder)
            if table.manifest.get("documents_fingerprint") == digest:
                return table
        except UserError:
            pass
        shutil.rmtree(folder)  # another knowledge base's, or damaged: it is derived data
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp"):  # what writers that died left; live ones keep theirs
        if process_alive(int(stale.name.split(".")[-2])):
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    starts = list(range(0, count, documents_per_shard)) or [0]
    names = [f"shard-{n:05d}" for n in range(len(starts))]
    mine = set(range(rank % len(starts), len(starts), max(world, 1)))
    for wanted in (mine, set(range(len(starts)))):  # this writer's shards, then any missing
        todo = {n for n in wanted if not (folder / names[n]).is_dir()}
        stream = iter(documents)
        for n in range(max(todo, default=-1) + 1):
            part = islice(stream, documents_per_shard)
            if n in todo and not (folder / names[n]).is_dir():
                _write_shard(folder / names[n], part, tokenizer, chunker)
            else:
                for _ in part:  # read past another writer's shard
                    pass
    shards = [_Shard.open(folder / name) for name in names]
    given = sum(len(s.documents) for s in shards)
    manifest = {
        "format": "m3.references",
        "format_version": 1,
        "references": int(sum(len(s.offsets) - 1 for s in shards)),
        "documents": given,
        "skipped": skipped + count - given,
        "documents_fingerprint": digest,
        "tokenizer": tokenizer.fingerprint(),
        "chunker": repr(chunker),
        "shards": [{"name": n, "first_document": s} for n, s in zip(names, starts, strict=True)],
    }
    manifest["knowledge"] = knowledge_fingerprint(ReferenceTable._of(folder, manifest, shards))
    tmp = folder / f"{TABLE_MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / TABLE_MANIFEST)
    return ReferenceTable(folder)


def _write_shard(
    path: Path, documents: Iterable[Document], tokenizer: Tokenizer, chunker: Chunker
) -> None:
    """Tokenize and cut a shard's documents, then make the shard visible by one rename."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # tokens stream to a raw file (a shard of 65,536 documents can hold 10^8 tokens);
    # offsets and spans are packed arrays, 8 and 24 bytes a reference
    offsets, spans, kept, position = array("q", [0]), array("q"), [], 0
    rows: dict[Any, int] = {}
    buffer = array("i")  # C int: int32 on the platforms m3 runs on

    def tokenized() -> Iterator[tuple[Any, list[int]]]:
        for document in documents:
            yield document.id, tokenizer.encode(document.text) if document.text.strip() else []

    with (tmp / "tokens.raw").open("wb") as raw:
        for reference in iter_references(tokenized(), chunker):
            if reference.doc_id not in rows:
                rows[reference.doc_id] = len(kept)
                kept.append(reference.doc_id)
            buffer.extend(reference.ids)
            position += len(reference.ids)
            offsets.append(position)
            spans.extend((rows[reference.doc_id], reference.start, reference.end))
            if len(buffer) >= 1 << 18:
                buffer.tofile(raw)
                del buffer[:]
        buffer.tofile(raw)
    _raw_to_npy(tmp / "tokens.raw", tmp / "tokens.npy", position)
    np.save(tmp / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    np.save(tmp / "spans.npy", np.frombuffer(spans, dtype=np.int64).reshape(-1, 3))
    (tmp / "documents.json").write_text(json.dumps(kept))
    try:
        os.rename(tmp, path)
    except OSError:  # another writer finished this shard first: the same bytes
        shutil.rmtree(tmp)


def _raw_to_npy(raw: Path, path: Path, count: int) -> None:
    """Make a raw file of `count` int32 values a `.npy` file: a header, then the bytes copied.

    (Written through the file, not a memory map: the pages stay page cache, not this
    process's memory.)
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
              "fortran_order": False, "shape": (count,)}  # fmt: skip
    with path.open("wb") as out, raw.open("rb") as source:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(source, out, 1 << 16)
    raw.unlink()
