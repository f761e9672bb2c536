"""`m3 smoke`: a quick end-to-end check of a model preset on this machine.

Builds a randomly initialised model, runs a prompt with random explicit memories in one
pass, decodes the rest of the sequence through the KV cache with a memory swap at every
chunk boundary, and checks that both give the same logits. It needs no data and no download;
`m3 run recipes/quickstart.yaml` is the real first run once training lands.
"""

from __future__ import annotations

import time

import torch

from m3.core.memories import Memories
from m3.model.config import Config
from m3.model.memory3 import Memory3


def smoke(*, preset: str = "tiny", seed: int = 0, batch: int = 2) -> float:
    """Run the smoke check and print what it measured.

    Args:
        preset: Model preset name.
        seed: Random seed.
        batch: Sequences decoded together.

    Returns:
        The largest absolute difference between cached decoding and the one-pass forward.

    Raises:
        RuntimeError: When the two disagree beyond float32 rounding.
    """
    config = Config.from_name(preset)
    torch.manual_seed(seed)
    model = Memory3(config).eval()
    chunk = config.chunk_length
    prompt_length, new_tokens = chunk + chunk // 2, chunk  # the prompt ends mid-chunk
    total = prompt_length + new_tokens
    chunks = -(-total // chunk)
    layers, _, heads, tokens, dim = config.memory_shape
    shape = (batch, chunks, config.memories_per_chunk, layers, heads, tokens, dim)
    keys, values = torch.randn(shape), torch.randn(shape)
    valid = torch.ones((*shape[:3], tokens), dtype=torch.bool)
    prefix = torch.tensor([1, 2])
    sequence = torch.randint(0, config.vocab_size, (batch, total))
    print(
        f"m3 smoke: preset {preset} ({config.num_parameters / 1e6:.2f}M parameters), "
        f"memory layers {list(config.memory_layers or ())}, memory shape {config.memory_shape}"
    )
    with torch.inference_mode():
        start = time.perf_counter()
        full = model(sequence, Memories.per_chunk(keys, values, valid), prefix=prefix)
        one_pass = time.perf_counter() - start

        cache = model.new_cache(batch, total, prefix=prefix)
        prompt_chunks = -(-prompt_length // chunk)
        logits = [
            model.prefill(
                sequence[:, :prompt_length],
                cache,
                memories=Memories.per_chunk(
                    keys[:, :prompt_chunks], values[:, :prompt_chunks], valid[:, :prompt_chunks]
                ),
            )
        ]
        start = time.perf_counter()
        for position in range(prompt_length, total):
            if bool(cache.starts_chunk.all()):
                c = position // chunk
                cache.swap_memories(
                    Memories.per_chunk(
                        keys[:, c : c + 1], values[:, c : c + 1], valid[:, c : c + 1]
                    )
                )
            logits.append(model.decode(sequence[:, position], cache)[:, None])
        decoding = time.perf_counter() - start
    error = (torch.cat(logits, dim=1) - full).abs().max().item()
    print(f"  one-pass forward of {batch}x{total} tokens: {one_pass * 1e3:.1f} ms")
    print(f"  cached decoding: {batch * new_tokens / decoding:.0f} tokens/s (batch {batch})")
    print(f"  max |cached - one-pass| logit difference: {error:.2e}")
    if error > 1e-3:
        raise RuntimeError(f"cached decoding disagrees with the one-pass forward by {error:.3g}")
    print("  ok")
    return error
