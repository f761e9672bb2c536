"""Text, before any model sees it: tokenizers, chunking, documents, sources, the test world.

`tokenizer` (byte and Hugging Face BPE tokenizers), `special_tokens` (the BOS, EOS and
pad tokens a checkpoint's tokenizer files name), `chunking` (tokenizer-agnostic
chunkers that cut a knowledge base into references, and the read path's 64-token query
chunks), `documents` (documents and corpus files), `sources` (where text comes from),
`stdlib_text` (general English text from Python's own docs), `world` (the seeded synthetic
world with its cloze questions and edits).

May import: `m3.core`.
"""

from __future__ import annotations

from m3.core.lazy import lazy_exports

# m3 0.1's `m3.data` was the training datamodule; its names now live in m3.training.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {},
    moved=dict.fromkeys(
        [
            "ContinualCollator", "EpochSampler", "SequenceDataset", "TextDataModule",
            "fingerprint", "open_memory_store", "pack", "pair_references",
        ],
        "m3.training.datamodule",
    ),
)  # fmt: skip
