"""The continual stage's pairing of training chunks with knowledge references (paper §3.5, §5).

- `pair_references` precomputes, for every 64-token chunk of every sequence, the one
  reference it retrieves: the chunk's text is embedded and searched; a candidate whose
  overlap with the training sequence exceeds 0.9 (Eq. 6) is skipped for the next hit.
- `pairing_fingerprint` is the digest a pairing file is saved under, computed one
  reference at a time.
- `reference_table_for` and `pairing_table` say where the pairing reads the knowledge
  base's references from.

**Where the references come from.** The pairing reads references by id, so it does not
need them as Python lists: `m3.training.datamodule.TextDataModule` reads them from a
reference table (`m3.bank.table`, memory-mapped arrays), the same one definition of
reference ids as the bank's (documents in order, each cut by the chunker; a test pins them
on the test world):

1. with `training.memories` (a bank), the **bank's own table** when it was cut from exactly
   these documents, tokenizer and chunker (its `documents_fingerprint` tells): nothing is
   tokenized again;
2. otherwise, when the pairing is cached in a file (`data.pairing_file`; `m3 fit`:
   `pairing.pt` in the run folder), a table **written next to it**, `pairing_table(file)`
   (`pairing.references/` beside `pairing.pt`), once the run folder is claimed; a resumed run
   keeps it, a run of another knowledge base replaces it;
3. otherwise (the API without a pairing file) the references are cut in memory, by
   `m3.bank.knowledge.read_knowledge`, as before the table existed.

All three give the same references under the same ids, so a pairing file is the same for
the same inputs, whichever path made it: its fingerprint hashes the references' token ids
exactly as it always did (`pairing_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from m3.backends.base import MemoryIndex
from m3.bank.layout import TABLE
from m3.bank.table import TABLE_MANIFEST, ReferenceTable, documents_fingerprint
from m3.core.errors import UserError
from m3.core.references import Reference
from m3.retrieval.embedders import Embedder
from m3.retrieval.overlap import leak_mask

if TYPE_CHECKING:
    from m3.data.chunking import Chunker
    from m3.data.documents import Document
    from m3.data.tokenizer import Tokenizer

#: References whose token ids are read at a time when hashing them.
_BATCH = 65536


def fingerprint(*parts: Any) -> str:
    """A sha256 digest of tensors, strings and JSON-serialisable values, in order.

    Args:
        *parts: The values; a tensor contributes its raw bytes, anything else its JSON text
            (keys sorted).

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for part in parts:
        _update(digest, part)
    return digest.hexdigest()


def _update(digest: Any, part: Any) -> None:
    if isinstance(part, Tensor):
        digest.update(part.detach().cpu().contiguous().numpy().tobytes())
    else:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())


def reference_tokens(references: Sequence[Reference], ids: Sequence[int]) -> list[list[int]]:
    """The token ids of references by id: a table's `tokens` when it has one, else `[i].ids`.

    Args:
        references: The references (id = position): a list, or a `ReferenceTable`.
        ids: Reference ids.

    Returns:
        One list of token ids per id, in order.
    """
    tokens = getattr(references, "tokens", None)
    if tokens is not None:
        return [array.tolist() for array in tokens(ids)]
    return [list(references[i].ids) for i in ids]


def pairing_fingerprint(
    train: Tensor,
    held_out: Tensor,
    references: Sequence[Reference],
    embedder_fingerprint: str,
    chunk_length: int,
    threshold: float,
    candidates: int,
) -> str:
    """The digest a pairing is saved under: its sequences, references and settings.

    Exactly `fingerprint(train, held_out, [list(r.ids) for r in references], ...)`, the
    digest pairing files have always carried, but with the references' JSON text hashed a
    batch of references at a time instead of built whole.

    Args:
        train: `(N, T + 1)` training sequences.
        held_out: `(M, T + 1)` held-out sequences.
        references: The knowledge base's references (id = position).
        embedder_fingerprint: The pairing embedder's fingerprint.
        chunk_length: Tokens per chunk.
        threshold: The pairing's leakage threshold.
        candidates: Search hits tried per chunk.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    _update(digest, train)
    _update(digest, held_out)
    digest.update(b"[")  # json.dumps of a list of lists of ints, one list at a time
    for start in range(0, len(references), _BATCH):
        ids = range(start, min(start + _BATCH, len(references)))
        text = ", ".join(json.dumps(tokens) for tokens in reference_tokens(references, ids))
        digest.update((", " if start else "").encode() + text.encode())
    digest.update(b"]")
    for part in (embedder_fingerprint, chunk_length, threshold, candidates):
        _update(digest, part)
    return digest.hexdigest()


def reference_table_for(
    folder: str | Path, documents: Sequence[Document], tokenizer: Tokenizer, chunker: Chunker
) -> ReferenceTable | None:
    """A bank's reference table, when it was cut from exactly these documents.

    Args:
        folder: A bank folder (`training.memories`).
        documents: The knowledge base's documents (`m3.bank.knowledge.read_documents`).
        tokenizer: The recipe's tokenizer.
        chunker: The recipe's chunker.

    Returns:
        The table; None when the bank has none (built before the table existed), it is
        damaged, or it was cut from other documents, by another tokenizer or chunker.
    """
    path = Path(folder) / TABLE
    if not (path / TABLE_MANIFEST).is_file():
        return None
    try:
        table = ReferenceTable(path)
    except UserError:
        return None
    if table.manifest.get("documents_fingerprint") != documents_fingerprint(
        documents, tokenizer, chunker
    ):
        return None
    return table


def pairing_table(pairing_file: str | Path) -> Path:
    """The folder of the reference table written next to a pairing file.

    Args:
        pairing_file: The pairing file (e.g. `runs/x/continual/pairing.pt`).

    Returns:
        Its name with the suffix `.references` (`runs/x/continual/pairing.references`): a
        folder of its own, so that it never replaces a bank's `references/`.
    """
    return Path(pairing_file).with_suffix(".references")


def pair_references(
    sequences: Tensor,
    references: Sequence[Reference],
    *,
    tokenizer: Tokenizer,
    embedder: Embedder,
    index: MemoryIndex,
    chunk_length: int = 64,
    threshold: float = 0.9,
    candidates: int = 8,
    batch_size: int = 1024,
) -> Tensor:
    """The reference each chunk of each training sequence retrieves (paper §3.5, §5).

    Args:
        sequences: `(N, T + 1)` packed sequences (inputs are `[:, :-1]`).
        references: The knowledge base's references; reference id = position (a list, or
            a `ReferenceTable`, read by id).
        tokenizer: Decodes chunk tokens to text for the embedder.
        embedder: Embeds chunk texts (the index holds the references' embeddings).
        index: Searchable index of the references' embeddings, by reference id.
        chunk_length: Tokens per chunk.
        threshold: Leakage threshold: a candidate overlapping the sequence by more is skipped.
        candidates: Hits searched per chunk before giving up (then the chunk gets −1).
        batch_size: Chunks embedded and searched together.

    Returns:
        `(N, C)` long reference ids, −1 where no candidate passed.
    """
    inputs = sequences[:, :-1]
    count, length = inputs.shape
    chunks = -(-length // chunk_length)
    pairing = torch.full((count, chunks), -1, dtype=torch.long)
    jobs = [(n, c) for n in range(count) for c in range(chunks)]
    for start in tqdm(
        range(0, len(jobs), batch_size), desc="pairing chunks with references", unit="batch"
    ):
        batch = jobs[start : start + batch_size]
        texts = [
            tokenizer.decode(inputs[n, c * chunk_length : (c + 1) * chunk_length].tolist())
            for n, c in batch
        ]
        hits = index.search(embedder.embed(texts), min(candidates, len(index))).ids.numpy()
        found_ids = np.unique(hits[hits >= 0]).tolist()  # each read once per batch
        tokens = dict(zip(found_ids, reference_tokens(references, found_ids), strict=True))
        for (n, c), row in zip(batch, hits.tolist(), strict=True):
            found = [i for i in row if i >= 0]
            if not found:
                continue
            leaks = leak_mask(inputs[n].tolist(), [tokens[i] for i in found], threshold)
            for reference_id, leaked in zip(found, leaks.tolist(), strict=True):
                if not leaked:
                    pairing[n, c] = reference_id
                    break
    return pairing
