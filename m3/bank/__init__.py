"""Memory banks: a knowledge base encoded into a store and an index, opened, edited.

`build` (`m3 build-memory`: every reference encoded with Lightning's predict loop, one
shard per rank, resumable, then the index), `edit` (`m3 edit`: knowledge edits of store and
index together, journaled).

May import: `m3.core`, `m3.model`, `m3.data`, `m3.recipes`, `m3.memory`, `m3.backends`,
`m3.retrieval`.
"""

from __future__ import annotations

from m3.core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        [
            "EDIT_JOURNAL", "MANIFEST", "QUANTIZER", "SCANN_ABOVE", "Bank", "BankEncoder",
            "BankWriter", "ColdStartStore", "KnowledgeBase", "ReferenceBatches", "ShardedStore",
            "bank_quantizer", "build_index", "build_memory", "open_bank", "open_bank_store",
            "read_knowledge", "shard_name",
        ],
        "m3.bank.build",
    ),
)  # fmt: skip
