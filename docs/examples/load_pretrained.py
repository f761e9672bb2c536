"""A pretrained Llama-family checkpoint (a Hugging Face folder) as a Memory³ model.

The folder holds `config.json`, the weights (`*.safetensors`) and `tokenizer.json`:
`python docs/examples/load_pretrained.py checkpoints/llama-1b`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from m3.data.tokenizer import HFTokenizer
from m3.model.checkpoints import config_from_hf, load_hf_checkpoint, load_hf_weights
from m3.training.module import Memory3Module


def load_pretrained(folder: str, memory_layers: Sequence[int] = range(8)) -> Memory3Module:
    """Run the checkpoint's model once, then load it into a continual-training module."""
    # --8<-- [start:load]
    config = config_from_hf(folder, memory_layers=memory_layers)
    print(config)  # what will be built

    model = load_hf_checkpoint(
        folder, memory_layers=memory_layers, memory_tokens=8, dtype=torch.bfloat16
    )
    tokenizer = HFTokenizer(folder)  # the checkpoint's own tokenizer
    idx = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("The capital of France is")]])
    logits = model(idx)  # (1, T, vocab): the pretrained model, warmup mode
    # --8<-- [end:load]
    print(tokenizer.decode([int(logits[0, -1].argmax())]))
    # --8<-- [start:module]
    module = Memory3Module(
        config, stage="continual", lr=5e-5, reference_prefix=tokenizer.reference_prefix()
    )
    load_hf_weights(module.model, folder)
    # --8<-- [end:module]
    return module


if __name__ == "__main__":
    load_pretrained(sys.argv[1])
