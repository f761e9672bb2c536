"""Step time of a continual step ÷ a warmup step, next to what the FLOPs predict (paper §5.3).

A continual step also encodes every chunk's reference through the memory layers: 32 chunks
x 128 tokens = 4096 reference tokens per 2048-token sequence, the same layer compute as the
context itself. With gradients through the encoding the FLOP count predicts ≈ 1.9-2.0x a
warmup step; forward-only ≈ 1.3x (the paper measured slightly over 2x). Deduplicating
references that several chunks of a batch retrieve removes encoding work.

    python benchmarks/training_step.py [--preset small] [--length 2048] [--batch 1]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds

from m3.model.config import Config
from m3.training.module import Memory3Module


def linear_flops_per_token(config: Config, layers: int, *, last_qkv_only: bool = False) -> float:
    """Forward FLOPs of the projections and MLPs of `layers` blocks for one token."""
    qkv = config.n_embd * config.head_dim * (config.n_head + 2 * config.n_kv_head)
    rest = config.n_head * config.head_dim * config.n_embd + 3 * config.n_embd * config.mlp_hidden
    full = layers - (1 if last_qkv_only else 0)
    return 2.0 * (full * (qkv + rest) + (qkv if last_qkv_only else 0))


def predicted_ratio(config: Config, length: int, ref_tokens: int, *, grad: bool) -> float:
    """Continual ÷ warmup step FLOPs (projections, MLPs, output head; attention ignored)."""
    context = length * (
        linear_flops_per_token(config, config.n_layer) + 2.0 * config.n_embd * config.vocab_size
    )
    memory_layers = max(config.memory_layers or (0,)) + 1
    encoding = ref_tokens * linear_flops_per_token(config, memory_layers, last_qkv_only=True)
    train = 3.0 * context  # forward + backward
    return (train + (3.0 if grad else 1.0) * encoding) / train


def batch_for(config: Config, batch: int, length: int, *, reuse: int, gen: torch.Generator) -> dict:
    chunks = length // config.chunk_length
    distinct = chunks // reuse  # each reference retrieved by `reuse` chunks of a sequence
    tokens = torch.randint(3, config.vocab_size, (batch, length + 1), generator=gen)
    tokens[:, 0] = 1
    slots = (torch.arange(chunks) // reuse).clamp(max=distinct - 1).expand(batch, chunks).clone()
    pool = (torch.arange(batch)[:, None] * distinct + torch.arange(distinct)).contiguous()
    refs = torch.randint(3, config.vocab_size, (batch * distinct, 128), generator=gen)
    return {
        "tokens": tokens,
        "pool": pool,
        "slots": slots,
        "reference_tokens": refs,
        "reference_lengths": torch.full((batch * distinct,), 128),
    }


def step_time(module: Memory3Module, batch: dict, repeats: int) -> float:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        logits = module(batch)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["tokens"][:, 1:].flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = Config.from_name(args.preset, block_size=max(args.length, 64))
    gen = torch.Generator().manual_seed(0)
    chunks = args.length // config.chunk_length
    prefix = [1, 5, 6]
    torch.manual_seed(0)
    warm = Memory3Module(config)
    base = step_time(
        warm, batch_for(config, args.batch, args.length, reuse=1, gen=gen), args.repeats
    )
    print(f"preset {args.preset}, batch {args.batch} x {args.length} tokens, {chunks} chunks, "
          f"128-token references, {torch.get_num_threads()} threads, fp32")  # fmt: skip
    print(f"{'step':<38}{'seconds':>9}{'÷ warmup':>10}{'FLOP prediction':>17}")
    print(f"{'warmup (no memory)':<38}{base:>9.3f}{1.0:>10.2f}{1.0:>17.2f}")
    for encode, reuse in (("grad", 1), ("no_grad", 1), ("grad", 2)):
        module = Memory3Module(config, stage="continual", reference_prefix=prefix, encode=encode)
        module.model.load_state_dict(warm.model.state_dict())
        batch = batch_for(config, args.batch, args.length, reuse=reuse, gen=gen)
        seconds = step_time(module, batch, args.repeats)
        ref_tokens = 128 * (chunks // reuse)
        predicted = predicted_ratio(config, args.length, ref_tokens, grad=encode == "grad")
        name = f"continual, encode={encode}" + (f", each ref x{reuse}" if reuse > 1 else "")
        print(f"{name:<38}{seconds:>9.3f}{seconds / base:>10.2f}{predicted:>17.2f}")
    print("paper: a continual step costs slightly over 2x a warmup step")


if __name__ == "__main__":
    main()
