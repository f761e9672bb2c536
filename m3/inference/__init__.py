"""Inference: a model with its bank, generating and scored (the paper's §3.1, §7).

`generate` (loading a model with its bank, `m3 generate` with memory swaps every 64
tokens, the RAG baseline), `evaluate` (`m3 evaluate`: cloze and held-out loss with
memory, without, with RAG, shuffled), `diagnostics` (attention share on memory).

May import: `m3.core`, `m3.model`, `m3.data`, `m3.recipes`, `m3.memory`, `m3.backends`,
`m3.retrieval`, `m3.bank`.
"""
