"""The read path by hand: a retriever over a bank's parts, one prompt pass, cached decoding.

What `m3.inference.generate.generate` does (paper §3.1), step by step, greedy and for one prompt:
`python docs/examples/read_path.py runs/tiny/bank "Ada Lovelace was born in"`.
"""

from __future__ import annotations

import sys

import torch

from m3.inference.generate import allowed_logits
from m3.inference.loading import load_inference
from m3.retrieval.retriever import Retriever


def read_path(bank: str, prompt: str, steps: int = 96) -> list[int]:
    """Continue `prompt` by `steps` greedy tokens; returns the generated token ids."""
    with load_inference(bank) as inference:  # the model, its tokenizer, the opened bank
        model, tokenizer, prefix = inference.model, inference.tokenizer, inference.prefix
        dtype = next(model.parameters()).dtype
        store, index, embedder, manifest = inference.bank
        # --8<-- [start:retriever]
        retriever = Retriever(
            embedder=embedder,  # the embedder that built the index (fitted weights too)
            index=index,  # ExactIndex / ScannIndex over reference embeddings
            store=store,  # HDF5Store / InMemoryStore / ShardedStore of sparse memories
            tokenizer=tokenizer,  # chunk token ids -> text for the embedder
            model=model,  # refused unless the store was written by these weights
            # the fingerprint of the embedder that built the index, from the bank's manifest
            expected_embedder_fingerprint=manifest["embedder"]["fingerprint"],
            k=5,
            threshold=2 / 3,
            overfetch=3,
            cache_size=4096,
        )
        context = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        idx = torch.tensor([context])  # (B, T) = (1, T)
        found = retriever.retrieve_context([context])  # ids (1, C, 5), memories per chunk
        memories = found.memories.to(dtype=dtype)  # the store's dtype -> the model's
        logits = model(idx, memories, prefix=prefix)  # (1, T, vocab): the prompt, one pass
        # --8<-- [end:retriever]
        # --8<-- [start:decode]
        cache = model.new_cache(1, len(context) + steps, prefix=prefix)
        logits = model.prefill(idx, cache, memories=memories)[:, -1]  # (1, vocab)
        generated = []
        for _ in range(steps):
            token = allowed_logits(logits, tokenizer).argmax(-1)  # (1,): greedy
            if cache.starts_chunk.any():  # the token opens a chunk: it reads new memories
                rows = cache.starts_chunk.nonzero()[:, 0]
                step = retriever.retrieve_next([context])  # with the last complete chunk
                cache.swap_memories(step.memories.to(dtype=dtype), rows)
            context.append(int(token))
            generated.append(int(token))
            logits = model.decode(token, cache)  # (1, vocab); the context is not recomputed
        # --8<-- [end:decode]
    print(repr(tokenizer.decode(generated)), retriever.cache_stats())
    return generated


if __name__ == "__main__":
    read_path(sys.argv[1], sys.argv[2])
