"""The write path: references become sparse explicit memories (the paper's §3.2–§3.3).

`encoder` (the model itself encodes each reference, through its memory layers only),
`sparsifier` (the top-k tokens per memory layer and key/value head), `quantize` (vector
quantization of the kept keys and values).

May import: `m3.core`, `m3.model`.
"""

from __future__ import annotations

from m3.core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["MemoryEncoder", "encode_references"], "m3.memory.encoder"),
        **dict.fromkeys(["DenseMemory", "Sparsifier", "TopKSparsifier"], "m3.memory.sparsifier"),
    },
    # m3 0.1's `m3.memory` held the memory containers, now shared by every layer
    moved=dict.fromkeys(
        ["Memories", "SparseMemory", "sliding_window_visibility"], "m3.core.memories"
    ),
)
