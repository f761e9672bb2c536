"""The model: a Llama-style decoder that reads explicit memories (the paper's §3.1–§3.4).

`config` (`Config` and its presets), `memory3` (the `Memory3` decoder, read top to bottom),
`attention` (memory attention: one softmax over a chunk's memories and its context),
`kv_cache` (the decoding cache and its memory region), `rope` (the rotary scaling of
long-context checkpoints: linear, llama3, yarn), `checkpoints` (Hugging Face Llama-family
weights in and out).

May import: `m3.core`.
"""

from __future__ import annotations

from m3.core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["Config", "PRESETS"], "m3.model.config"),
        **dict.fromkeys(
            [
                "Attention", "Block", "GatedMLP", "LayerStates", "Memory3", "RMSNorm",
                "RotaryEmbedding", "apply_rotary", "build_norm",
            ],
            "m3.model.memory3",
        ),
        **dict.fromkeys(
            ["ChunkMemories", "anchored_causal_attention", "attend_with_memory", "memory_part"],
            "m3.model.attention",
        ),
        "KVCache": "m3.model.kv_cache",
        "RopeScaling": "m3.model.rope",
    },
)  # fmt: skip
