"""A randomly initialised tiny model, without memory and reading random explicit memories.

Needs no data and no download: `python docs/examples/first_forward.py`.
"""

from __future__ import annotations

import torch

from m3.core.memories import Memories
from m3.model.config import Config
from m3.model.memory3 import Memory3


def first_forward(preset: str = "tiny") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the same tokens in warmup mode and in memory mode, `(B, T, vocab)` each."""
    config = Config.from_name(preset)
    model = Memory3(config)
    idx = torch.randint(0, config.vocab_size, (2, 160))  # (B, T), token 0 is the BOS

    plain = model(idx)  # warmup mode: no memory

    # memory mode: 5 memories for each of the 3 chunks of 64 tokens (the last one partial)
    L_mem, _, H_kv, k, d_h = config.memory_shape  # tiny: (2, 2, 2, 8, 16)
    keys = torch.randn(2, 3, 5, L_mem, H_kv, k, d_h)  # (B, C, m, L_mem, H_kv, k, d_h)
    valid = torch.ones(2, 3, 5, k, dtype=torch.bool)  # (B, C, m, k): every slot holds a token
    memories = Memories.per_chunk(keys, keys.clone(), valid)  # chunk c sees its own 5
    prefix = torch.tensor([1, 2, 3])  # ids of "<s>Reference:" (here: any ids)
    with_memory = model(idx, memories, prefix=prefix)
    print(plain.shape, with_memory.shape, (plain - with_memory).abs().max())
    return plain, with_memory


if __name__ == "__main__":
    first_forward()
