"""Training: the paper's two stages with Lightning (§3.5, §5).

`module` (`Memory3Module`: warmup and continual stages, AdamW with the WSD schedule),
`datamodule` (packed sequences, the stage's data), `pairing` (each training chunk's
reference, read by id from a reference table), `collate` (the continual collator: each
row's pool of references, with distractors on request), `fit` (`m3 fit`: a recipe's stage,
run in its run folder, resumable).

May import: `m3.core`, `m3.model`, `m3.data`, `m3.recipes`, `m3.memory`, `m3.backends`,
`m3.retrieval`, `m3.bank`.
"""
