"""Vector-quantized memories: a codec trained on sampled references, codes kept in a store.

A random tiny model encodes a small synthetic world's knowledge base; a reduced-width
composite codec (the paper's structure for 16-dim vectors) is trained on a uniform sample of
the references, codes them, and an `HDF5Store` keeps the codes:
`python docs/examples/quantize_memories.py OUT_DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from m3.backends import HDF5Store, StoreInfo
from m3.core.memories import SparseMemory
from m3.data.chunking import FixedChunker, chunk_documents
from m3.data.tokenizer import ByteTokenizer
from m3.data.world import World
from m3.memory.encoder import encode_references
from m3.memory.quantize import CompositeQuantizer, MemoryQuantizer, memory_vectors, relative_error
from m3.model.config import Config
from m3.model.memory3 import Memory3

#: the paper's codec is `CompositeQuantizer(80)` (OPQ20_80,Residual2x14,PQ8x10: 14 bytes per
#: 80-dim vector); these widths suit the tiny model's 16-dim heads: 2 + 2 bytes per vector
SMALL = {"opq_subspaces": 4, "opq_bits": 4, "coarse_bits": 6, "pq_subspaces": 4, "pq_bits": 4}


def quantize(directory: str, sizes: dict[str, int] | None = None) -> SparseMemory:
    """Train, code, store and read back; returns the memories the store decodes."""
    config = Config.from_name("tiny")
    torch.manual_seed(0)
    model = Memory3(config).eval()
    tokenizer = ByteTokenizer()
    world = World.generate(0, **(sizes or {"n_people": 48, "n_places": 16, "n_orgs": 16}))
    documents = [(d.id, tokenizer.encode(d.text)) for d in world.knowledge_base()]
    references = chunk_documents(documents, FixedChunker(config.reference_length))
    with torch.no_grad():
        memory = encode_references(
            model, [r.ids for r in references], prefix=tokenizer.reference_prefix()
        )
    pick = torch.randperm(len(memory), generator=torch.Generator().manual_seed(0))
    sample = memory[pick[: len(memory) // 2]]  # uniformly sampled references
    # --8<-- [start:codec]
    codec = MemoryQuantizer(CompositeQuantizer(config.head_dim, **SMALL))  # keys and values
    codec.fit(sample)  # the valid key and value vectors of a SparseMemory, trained apart
    codes = codec.encode(memory)  # QuantizedMemory: (N, L_mem, H_kv, k, code_bytes) uint8 each
    decoded = codec.decode(codes, dtype=torch.bfloat16)  # a SparseMemory again
    codec.save(Path(directory) / "bank.quantizer")  # or codec.to_bytes(), inside another file
    # --8<-- [end:codec]
    keys, approx = memory_vectors(memory, part="keys"), memory_vectors(decoded, part="keys")
    print(codes.keys.shape, "codes; key error", round(relative_error(keys, approx), 3))
    # --8<-- [start:store]
    info = StoreInfo(memory_shape=config.memory_shape, dtype="bfloat16")  # decoded to bf16
    ids = torch.arange(len(references))
    with HDF5Store(Path(directory) / "bank.h5", info=info, mode="w", quantizer=codec) as store:
        store.write(ids, memory, references)  # keys and values -> codes of code_bytes each
        store.mark_complete()
    with HDF5Store(Path(directory) / "bank.h5") as store:  # reopens with the quantizer it holds
        stored = store.read(ids)  # decoded, bf16, the usual SparseMemory shapes
    # --8<-- [end:store]
    print(len(stored), "references read back,", codec.memory_bytes(config.memory_shape), "bytes")
    return stored


if __name__ == "__main__":
    quantize(sys.argv[1])
