"""Continue prompts while reading a bank's memories, and show what every chunk read.

Run on a bank (its recipe names the weights that wrote it), with one or more prompts:
`python docs/examples/generate_text.py runs/tiny/bank "Ada Lovelace was born in" "The bridge"`.
"""

from __future__ import annotations

import sys

from m3.inference.generate import Generation, generate
from m3.inference.loading import load_inference


def continue_prompts(bank: str, prompts: list[str], max_new_tokens: int = 64) -> Generation:
    """Sample a continuation of every prompt (one batch) and print each chunk's references."""
    with load_inference(bank) as inference:  # or a recipe file, or a Recipe
        out = generate(
            inference,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=0.8,
            top_p=0.9,
            seed=1,  # the same seed gives the same text
        )
        print(inference.retriever.phase_times())  # embed, search, filter, cache, read, …
    for prompt, text, rows in zip(out.prompts, out.texts, out.provenance, strict=True):
        print(prompt + text)
        for chunk in rows:  # ChunkReferences: the token span [start, end) read these ids
            print(chunk.chunk, chunk.start, chunk.end, chunk.retrieved_with, chunk.ids)
    print(out.finish_reasons, out.times)  # "eos" or "length"; seconds per phase
    return out


if __name__ == "__main__":
    continue_prompts(sys.argv[1], sys.argv[2:])
