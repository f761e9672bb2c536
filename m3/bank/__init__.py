"""Memory banks: a knowledge base encoded into a store and an index, opened, edited.

`knowledge` (the knowledge base read into references: the one definition of reference
ids), `table` (those references on disk, memory-mapped, read by id), `writer` (the
Lightning parts that encode references into a rank's shard), `build` (`m3 build-memory`:
the reference table, then every reference encoded, one shard per rank, resumable, then the
index), `layout` (what a bank folder holds), `open` (a finished bank as one store, its index
and its embedder), `edit` (`m3 edit`: knowledge edits of store and index together),
`layers` (an edit as a layer over the bank, committed by one rename while readers read),
`journal` (the redo journal of earlier m3 versions' in-place edits, for `--resume`).

May import: `m3.core`, `m3.model`, `m3.data`, `m3.recipes`, `m3.memory`, `m3.backends`,
`m3.retrieval`.
"""

from __future__ import annotations

from m3.core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["EDIT_JOURNAL", "MANIFEST", "QUANTIZER", "shard_name"], "m3.bank.layout"),
        **dict.fromkeys(["KnowledgeBase", "read_knowledge"], "m3.bank.knowledge"),
        **dict.fromkeys(["BankEncoder", "BankWriter", "ReferenceBatches"], "m3.bank.writer"),
        **dict.fromkeys(["Bank", "open_bank", "open_bank_store"], "m3.bank.open"),
        **dict.fromkeys(["bank_quantizer", "build_index", "build_memory"], "m3.bank.build"),
        "SCANN_ABOVE": "m3.recipes.defaults",
    },
    # m3 0.1's `m3.bank` also held these stores, now backends
    moved={"ShardedStore": "m3.backends.sharded", "ColdStartStore": "m3.backends.cold_start"},
)
