"""The leakage filter (the paper's Eq. 6): does a reference overlap the text it would serve?

`python docs/examples/leakage_filter.py` (bytes as tokens).
"""

from __future__ import annotations

import torch

from m3.data.tokenizer import ByteTokenizer
from m3.retrieval.overlap import exceeds, leak_mask, overlap


def leakage_filter() -> torch.Tensor:
    """Score three references against one text; returns the mask that drops the leaks."""
    tokenizer = ByteTokenizer()
    text_ids = tokenizer.encode("In 1843 Ada Lovelace published the first computer program.")
    retrieved_refs = [
        tokenizer.encode("Ada Lovelace published the first program"),  # nearly all in the text
        tokenizer.encode("Ada Lovelace, a mathematician, was born in London."),
        tokenizer.encode("The Analytical Engine was never finished."),
    ]
    reference_ids = retrieved_refs[1]
    print(overlap(text_ids, reference_ids))  # max LCS with a ≤ 2|r| window, over |r|
    print(exceeds(text_ids, reference_ids, 2 / 3))  # the decision, with early exits
    drop = leak_mask(text_ids, retrieved_refs, 0.9)  # (R,) bool tensor, True = drop
    print(drop.tolist())
    return drop


if __name__ == "__main__":
    leakage_filter()
