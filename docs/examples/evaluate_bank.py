"""Score one model with and without its memories: cloze questions and held-out text.

Run on a bank and the world files next to it (`World.write`, or the quickstart's data stage):
`python docs/examples/evaluate_bank.py runs/quickstart/bank runs/quickstart/data`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from m3.data.documents import read_corpus
from m3.data.world import read_cloze
from m3.inference.evaluate import evaluate_cloze, evaluate_heldout, markdown_table
from m3.inference.loading import load_inference


def evaluate(bank: str, data: str, *, seq_length: int = 256) -> str:
    """Cloze accuracy and held-out loss in every mode; returns the report's Markdown table."""
    questions = read_cloze(Path(data) / "cloze.jsonl")
    texts = [d.text for d in read_corpus([Path(data) / "heldout.jsonl"]).documents]
    with load_inference(bank) as inference:
        model, tokenizer, retriever = inference.model, inference.tokenizer, inference.retriever
        cloze = evaluate_cloze(model, tokenizer, questions, retriever=retriever)
        heldout = evaluate_heldout(
            model,
            tokenizer,
            texts,
            retriever=retriever,
            protocols=["paper", "causal"],
            seq_length=seq_length,  # tokens per window after its <s>
            max_sequences=64,
        )
    # cloze: mode -> ClozeScore; heldout: protocol -> mode -> TextScore
    print(cloze["memory"].accuracy, cloze["memory"].interval, cloze["none"].accuracy)
    print(heldout["paper"]["memory"].loss, heldout["causal"]["memory"].loss)
    return markdown_table(cloze, heldout)


if __name__ == "__main__":
    print(evaluate(sys.argv[1], sys.argv[2]))
