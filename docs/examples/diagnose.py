"""Does a model read its memories? Attention share on memory and the kept tokens, as text.

Run on a bank and its weights: `python docs/examples/diagnose.py runs/quickstart/bank "Prompt"`.
"""

from __future__ import annotations

import sys

import torch

from m3.inference.diagnostics import kept_tokens, memory_attention
from m3.inference.loading import load_inference


def diagnose(bank: str, prompt: str) -> torch.Tensor:
    """Print what the prompt's chunks read and how much attention went there."""
    with load_inference(bank) as inference:
        tokenizer, retriever = inference.tokenizer, inference.retriever
        idx = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]])
        found = retriever.retrieve_context(idx.tolist())  # the memories of every chunk
        shares = memory_attention(inference.model, idx, found.memories, prefix=inference.prefix)
        # (memory layers, batch, heads, tokens) -> one share per layer and head
        print("attention share on memory, per layer (rows) and head (columns):")
        print(shares.mean(dim=(1, 3)))
        best = int(found.ids[0, 0, 0])  # the first chunk's best reference
        reference = retriever.store.references([best])[0]
        print(f"reference {best}: {tokenizer.decode(list(reference.ids))!r}")
        memory = retriever.store.read(torch.tensor([best]))
        for layer, heads in enumerate(kept_tokens(memory[0], reference.ids, tokenizer)):
            print(f"layer {layer} kept:", [" ".join(tokens) for tokens in heads])
        return shares


if __name__ == "__main__":
    diagnose(sys.argv[1], sys.argv[2])
