"""Inference: a model with its bank, generating and scored (the paper's §3.1, §7).

`loading` (a model with its bank, checked to belong together), `generate` (`m3 generate`:
memory swaps every 64 tokens, provenance), `rag` (the RAG baseline: references read as
text), `evaluate` (`m3 evaluate`: cloze and held-out loss with memory, without, with RAG,
shuffled), `edits` (do answers follow knowledge edits?), `diagnostics` (attention share on
memory, the tokens kept).

May import: `m3.core`, `m3.model`, `m3.data`, `m3.recipes`, `m3.memory`, `m3.backends`,
`m3.retrieval`, `m3.bank`.
"""
