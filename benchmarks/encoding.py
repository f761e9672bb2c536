"""Write-path throughput: references encoded and sparsified per second, per preset.

Each reference has 128 tokens after a 3-token prefix and runs through the memory layers
only (paper §3.3), then the top-k tokens per layer and head are kept.

    python benchmarks/encoding.py [--presets tiny small] [--references 512] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from m3.memory.encoder import encode_references
from m3.model.config import Config
from m3.model.memory3 import Memory3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--references", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    print(
        f"{args.references} references of 128 tokens, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, fp32"
    )
    print(
        f"{'preset':<10}{'memory layers':>15}{'refs/s':>10}{'tokens/s':>12}"
        f"{'full-model tokens/s':>22}"
    )
    for preset in args.presets:
        config = Config.from_name(preset)
        torch.manual_seed(0)
        model = Memory3(config).eval()
        gen = torch.Generator().manual_seed(0)
        references = torch.randint(3, config.vocab_size, (args.references, 128), generator=gen)
        references = references.tolist()
        with torch.inference_mode():
            encode_references(model, references[: args.batch], prefix=[0, 1, 2])  # warm up
            start = time.perf_counter()
            encode_references(model, references, prefix=[0, 1, 2], batch_size=args.batch)
            seconds = time.perf_counter() - start
            # the same tokens through the whole model, for scale
            idx = torch.tensor(references[: args.batch])
            start = time.perf_counter()
            model(idx)
            full = time.perf_counter() - start
        layers = f"{len(config.memory_layers or ())}/{config.n_layer}"
        print(
            f"{preset:<10}{layers:>15}{args.references / seconds:>10.0f}"
            f"{args.references * 128 / seconds:>12.0f}{args.batch * 128 / full:>22.0f}"
        )


if __name__ == "__main__":
    main()
