"""References encoded into sparse memories, written to a store and read back.

A random tiny model encodes a few sentences; the memories go into an `InMemoryStore` and an
`HDF5Store` (one line differs), then into an HDF5 bank built resumably and marked complete:
`python docs/examples/store_round_trip.py OUT_DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from m3.backends import HDF5Store, InMemoryStore, StoreInfo
from m3.core.memories import SparseMemory
from m3.data.chunking import FixedChunker, chunk_documents
from m3.data.tokenizer import ByteTokenizer
from m3.memory.encoder import encode_references
from m3.model.config import Config
from m3.model.memory3 import Memory3

TEXTS = [
    "Ada Lovelace wrote the first published program, for the Analytical Engine.",
    "The Analytical Engine was a mechanical computer designed by Charles Babbage.",
    "Babbage never finished it; a part of its mill was built after his death.",
]


def round_trip(directory: str) -> SparseMemory:
    """Encode `TEXTS`, store and read the memories; returns those of the finished bank."""
    config = Config.from_name("tiny")
    torch.manual_seed(0)  # the same random weights every run: a second run resumes the bank
    model = Memory3(config).eval()
    tokenizer = ByteTokenizer()
    documents = [(f"doc-{n}", tokenizer.encode(text)) for n, text in enumerate(TEXTS)]
    references = chunk_documents(documents, FixedChunker(config.reference_length))
    ids = torch.arange(len(references))  # a reference's id: its position in the list
    # --8<-- [start:encode]
    prefix = tokenizer.reference_prefix()  # ids of "<s>Reference:", in place of the BOS
    with torch.no_grad():  # keys and values (N, L_mem, H_kv, k, d_h), valid (N, k)
        memory = encode_references(model, [r.ids for r in references], prefix=prefix)
    # --8<-- [end:encode]
    # --8<-- [start:swap]
    info = StoreInfo(
        memory_shape=config.memory_shape,  # (L_mem, 2, H_kv, k, d_h)
        dtype="bfloat16",
        model_fingerprint=model.memory_fingerprint(),
    )
    scratch = Path(directory) / "scratch.h5"
    for store in (InMemoryStore(info), HDF5Store(scratch, info=info, mode="w")):
        store.write(ids, memory, references)  # memory: SparseMemory of len(ids)
        back = store.read(torch.tensor([2, 0, 2]))  # keys (3, L_mem, H_kv, k, d_h), bf16
        assert torch.equal(back.keys[1], memory.keys[0].to(torch.bfloat16))
        store.close()
    # --8<-- [end:swap]
    # --8<-- [start:build]
    path = Path(directory) / "bank.h5"
    batches = [ids[:2], ids[2:]]
    with HDF5Store(path, info=info, mode="a") as store:  # creates, or resumes
        for batch in batches:
            todo = [i for i in batch.tolist() if i not in store]  # what is not stored yet
            if todo:  # encode and write what is missing
                chosen = [references[i] for i in todo]
                with torch.no_grad():
                    part = encode_references(model, [r.ids for r in chosen], prefix=prefix)
                store.write(torch.tensor(todo), part, chosen)
        store.mark_complete()  # flush, fsync, then the flag

    bank = HDF5Store(path)  # read-only; refuses a file that was never marked complete
    bank.check_model(config.memory_shape, model.memory_fingerprint())
    # --8<-- [end:build]
    doc_id, start, end, _ = bank.references([0])[0]  # provenance: document and token span
    print(len(bank), "references;", doc_id, start, end, bank.info.memory_shape)
    stored = bank.read(ids)
    bank.close()
    return stored


if __name__ == "__main__":
    round_trip(sys.argv[1])
