"""Prompt processing: the one-pass memory forward vs the paper's per-chunk loop, side by side.

The loop processes chunk after chunk through the KV cache, swapping in each chunk's memories
(what the paper's implementation does, and names as a cause of its slowdown); the one-pass
path reads every chunk's memories in a single forward. Both give the same logits (pinned by
tests/test_model.py); this measures their speed, and the cost of memory over warmup mode.

    python benchmarks/prompt_pass.py [--preset small] [--length 2048] [--batch 1]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians

from m3.core.memories import Memories
from m3.model.config import Config
from m3.model.memory3 import Memory3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = Config.from_name(args.preset)
    torch.manual_seed(0)
    model = Memory3(config).eval()
    batch, length, chunk = args.batch, args.length, config.chunk_length
    chunks = -(-length // chunk)
    per_chunk = config.memories_per_chunk
    layers, _, heads, tokens, dim = config.memory_shape
    shape = (batch, chunks, per_chunk, layers, heads, tokens, dim)
    keys, values = torch.randn(shape), torch.randn(shape)
    valid = torch.ones(batch, chunks, per_chunk, tokens, dtype=torch.bool)
    memories = Memories.per_chunk(keys, values, valid)
    prefix = torch.tensor([1, 2, 3])
    idx = torch.randint(0, config.vocab_size, (batch, length))

    def one_pass() -> torch.Tensor:
        return model(idx, memories, prefix=prefix)

    def per_chunk_loop() -> torch.Tensor:
        cache = model.new_cache(batch, length, prefix=prefix)
        first = Memories.per_chunk(keys[:, :1], values[:, :1], valid[:, :1])
        pieces = [model.prefill(idx[:, :chunk], cache, memories=first)]
        for c in range(1, chunks):
            one = Memories.per_chunk(keys[:, c : c + 1], values[:, c : c + 1], valid[:, c : c + 1])
            cache.swap_memories(one)
            pieces.append(model.extend(idx[:, c * chunk : (c + 1) * chunk], cache))
        return torch.cat(pieces, dim=1)

    def warmup() -> torch.Tensor:
        return model(idx)

    with torch.inference_mode():
        error = (one_pass() - per_chunk_loop()).abs().max().item()
        timed = interleaved_medians(
            {"one": one_pass, "loop": per_chunk_loop, "warm": warmup}, args.repeats
        )
        t_one, t_loop, t_warm = timed["one"], timed["loop"], timed["warm"]

    tokens_total = batch * length
    print(
        f"preset {args.preset}, batch {batch} x {length} tokens, {chunks} chunks x "
        f"{per_chunk} memories, memory shape {config.memory_shape}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'path':<28}{'seconds':>10}{'tokens/s':>12}")
    for name, seconds in [
        ("one pass (m3)", t_one),
        ("per-chunk loop (paper)", t_loop),
        ("warmup mode, no memory", t_warm),
    ]:
        print(f"{name:<28}{seconds:>10.3f}{tokens_total / seconds:>12.0f}")
    print(f"one pass / loop throughput ratio: {t_loop / t_one:.2f}  (goal >= 1.0)")
    print(f"memory / no-memory throughput ratio: {t_warm / t_one:.2f}")
    print(f"max |logit difference| one pass vs loop: {error:.2e}")


if __name__ == "__main__":
    main()
