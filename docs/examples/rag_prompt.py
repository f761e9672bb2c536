"""The RAG baseline's prompt: the references a prompt retrieves, as text before it.

Run on a bank: `python docs/examples/rag_prompt.py runs/tiny/bank "Ada Lovelace was born in"`.
"""

from __future__ import annotations

import sys

from m3.inference.loading import load_inference
from m3.inference.rag import rag_context, rag_references


def rag_prompt(bank: str, prompt: str) -> str:
    """Retrieve `k` references once, with the whole prompt as query, and put them before it."""
    with load_inference(bank) as inference:
        found = rag_references(inference.retriever, [prompt])  # per prompt, best first
    for reference in found[0]:
        print(reference.id, round(reference.score, 3), repr(reference.text))
    return rag_context(prompt, [r.text for r in found[0]])
    # "Reference: <text 1>\nReference: <text 2>\n…Ada Lovelace was born in"


if __name__ == "__main__":
    print(rag_prompt(sys.argv[1], sys.argv[2]))
