"""Change what a bank knows without training: replace one document's text, delete another.

Edits the bank in place (copy it first to keep the original):
`python docs/examples/edit_bank.py runs/tiny/bank`.
"""

from __future__ import annotations

import sys

from m3.bank.edit import EditSummary, edit_bank
from m3.inference.loading import load_inference


def edit(bank: str) -> EditSummary:
    """Re-encode one document of the knowledge base and remove another."""
    with load_inference(bank) as inference:  # the weights that wrote the bank, its tokenizer
        model, tokenizer = inference.model, inference.tokenizer
    summary = edit_bank(
        bank,
        model=model,
        tokenizer=tokenizer,
        replace={"person-0007.1": "Velmora Quist worked as a tailor in Ashgrove."},
        delete=["place-0003.0"],
    )
    print(summary.describe())
    return summary


if __name__ == "__main__":
    edit(sys.argv[1])
