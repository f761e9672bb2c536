"""Vector quantization of memories: reconstruction error per codec, and the loss it costs.

Memory vectors come from m3's own write path: random-token references of 128 tokens are
encoded by a randomly initialised model (preset `small` with 80-dim heads, the paper's head
size) and sparsified to 8 tokens per memory layer and head. The quantizers are trained on the
key (or value) vectors of 80% of the references and measured on the other 20%:

- relative error `Σ‖x − x̂‖² / Σ‖x‖²` of keys and values, per configuration, next to FAISS's
  error for the same structure and settings where `faiss` is importable (it is not an m3
  dependency: `pip install faiss-cpu` to see that column);
- the change of held-out loss when the model reads decoded instead of exact memories, with
  the change from reading no memories at all for scale, and the mean KL divergence between
  the next-token distributions with exact and with decoded memories.

A randomly initialised model's vectors are close to Gaussian, the hardest case for a
quantizer (no clusters, no low-dimensional structure): errors of a trained model's memories
are expected to be lower. `--paper` adds the paper's widths (2^14-centroid coarse codebooks:
minutes of CPU time).

    python benchmarks/quantization.py [--references 1200] [--opq-iterations 10] [--paper]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from m3.core.memories import Memories, SparseMemory
from m3.memory.encoder import encode_references
from m3.memory.quantize import (
    CompositeQuantizer,
    Int8Quantizer,
    MemoryQuantizer,
    ProductQuantizer,
    RawQuantizer,
    VectorQuantizer,
    memory_vectors,
    relative_error,
)
from m3.model.config import Config
from m3.model.memory3 import Memory3

PREFIX = [0, 1, 2]
#: K/V vectors of one paper memory (22 layers × 8 heads × 8 tokens, keys and values)
PAPER_VECTORS = 22 * 8 * 8 * 2

try:
    import faiss
except ImportError:  # faiss is an optional oracle, never a dependency
    faiss = None


def configurations(args: argparse.Namespace) -> list[tuple[str, Callable[[], VectorQuantizer]]]:
    """Name and builder of every configuration measured, for 80-dim vectors."""
    dim, opq = 80, args.opq_iterations
    configs: list[tuple[str, Callable[[], VectorQuantizer]]] = [
        ("raw (bf16)", lambda: RawQuantizer(dim)),
        ("int8 + fp16 scale", lambda: Int8Quantizer(dim)),
    ]
    for subspaces, bits in ((8, 4), (8, 6), (8, 8), (8, 10), (16, 7)):
        configs.append(
            (
                f"PQ{subspaces}x{bits}",
                lambda s=subspaces, b=bits: ProductQuantizer(dim, subspaces=s, bits=b),
            )
        )
    for coarse_bits, pq_bits in ((8, 8), (10, 10)):
        configs.append(
            (
                f"OPQ20_80,Residual2x{coarse_bits},PQ8x{pq_bits}",
                lambda c=coarse_bits, p=pq_bits: CompositeQuantizer(
                    dim, opq_iterations=opq, coarse_bits=c, pq_bits=p
                ),
            )
        )
    configs.append(
        (
            "OPQ20_80 + residual 2x8 + PQ8x8",
            lambda: CompositeQuantizer(
                dim, opq_iterations=opq, coarse="residual", coarse_bits=8, pq_bits=8
            ),
        )
    )
    if args.paper:
        configs.append(
            (
                "OPQ20_80,Residual2x14,PQ8x10 (paper)",
                lambda: CompositeQuantizer(
                    dim, opq_iterations=opq, iterations=args.paper_iterations
                ),
            )
        )
    return configs


def faiss_error(quantizer: VectorQuantizer, train: torch.Tensor, test: torch.Tensor) -> Any:
    """FAISS's relative error for the same structure and settings, or a reason it has none."""
    if faiss is None:
        return "faiss not installed"
    if isinstance(quantizer, ProductQuantizer):
        index = faiss.IndexPQ(quantizer.dim, quantizer.subspaces, quantizer.bits)
        settings = [index.pq.cp]
    elif isinstance(quantizer, CompositeQuantizer) and quantizer.factory_string:
        index = faiss.index_factory(quantizer.dim, quantizer.factory_string)
        if quantizer.opq_subspaces is not None:
            faiss.downcast_VectorTransform(index.chain.at(0)).niter = quantizer.opq_iterations
        two_layer = faiss.downcast_index(index.index)
        multi_index = faiss.downcast_index(two_layer.q1.quantizer)
        settings = [two_layer.q1.cp, multi_index.pq.cp, two_layer.pq.cp]
    else:
        return "-"
    for clustering in settings:  # the same k-means iterations as m3, no small-sample warnings
        clustering.niter = quantizer.iterations
        clustering.min_points_per_centroid = 1
    start = time.perf_counter()
    index.train(train.numpy())
    seconds = time.perf_counter() - start
    decoded = index.sa_decode(index.sa_encode(test.numpy()))
    return relative_error(test, torch.from_numpy(decoded)), seconds


def held_out_loss(
    model: Memory3, tokens: torch.Tensor, memory: SparseMemory | None
) -> tuple[float, torch.Tensor]:
    """Mean next-token loss and log-probabilities of `tokens` `(B, T)` reading `memory`."""
    config = model.config
    batch, length = tokens.shape
    chunks = -(-length // config.chunk_length)
    if memory is None:
        memories = Memories.empty(batch, chunks, memory_shape=config.memory_shape)
    else:
        per = config.memories_per_chunk
        index = torch.arange(batch * chunks * per).view(batch, chunks, per)
        memories = Memories.per_chunk(
            memory.keys[index].float(), memory.values[index].float(), memory.valid[index]
        )
    with torch.inference_mode():
        logits = model(tokens, memories, prefix=torch.tensor(PREFIX))
    logp = logits[:, :-1].log_softmax(-1)
    loss = -logp.gather(-1, tokens[:, 1:, None]).mean()
    return float(loss), logp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--head-dim", type=int, default=80)
    parser.add_argument("--references", type=int, default=1200)
    parser.add_argument("--opq-iterations", type=int, default=10)
    parser.add_argument("--paper", action="store_true", help="add the paper's widths")
    parser.add_argument("--paper-iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--only", help="measure only configurations whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)

    config = Config.from_name(args.preset, head_dim=args.head_dim)
    torch.manual_seed(0)
    model = Memory3(config).eval()
    generator = torch.Generator().manual_seed(0)
    references = torch.randint(3, config.vocab_size, (args.references, 128), generator=generator)
    start = time.perf_counter()
    with torch.inference_mode():
        memory = encode_references(model, references.tolist(), prefix=PREFIX)
    split = int(0.8 * args.references)
    train, test = memory[:split], memory[split:]
    parts = {
        part: (memory_vectors(train, part=part), memory_vectors(test, part=part))
        for part in ("keys", "values")
    }
    print(
        f"preset {args.preset} with head_dim {args.head_dim}: memory shape {config.memory_shape}; "
        f"{args.references} references encoded in {time.perf_counter() - start:.1f} s; "
        f"{len(parts['keys'][0])} training and {len(parts['keys'][1])} test vectors per part; "
        f"{args.threads} threads; OPQ iterations {args.opq_iterations}; "
        f"faiss {'not installed' if faiss is None else faiss.__version__}"
    )

    # held-out sequences, each chunk reading 5 test references' memories
    chunks = 4
    length = chunks * config.chunk_length
    needed = args.sequences * chunks * config.memories_per_chunk
    if needed > len(test):
        raise SystemExit(f"--references too small: {needed} test references needed")
    tokens = torch.randint(3, config.vocab_size, (args.sequences, length), generator=generator)
    readers = test[:needed]
    none_loss, _ = held_out_loss(model, tokens, None)
    exact_loss, exact_logp = held_out_loss(model, tokens, readers)
    print(
        f"held-out loss over {args.sequences}×{length} tokens: {exact_loss:.5f} with exact "
        f"memories, {none_loss:.5f} with none (Δ {none_loss - exact_loss:+.2e})"
    )

    header = (
        f"{'configuration':<38}{'B/vec':>6}{'B/paper mem':>12}{'keys err':>10}{'values err':>11}"
        f"{'faiss keys':>12}{'faiss values':>13}{'fit s':>7}{'faiss s':>8}{'Δ loss':>10}"
        f"{'KL':>9}"
    )
    print(header)
    for name, build in configurations(args):
        if args.only and args.only not in name:
            continue
        errors, faiss_errors, seconds, faiss_seconds = [], [], 0.0, 0.0
        quantizers = {}
        for part, (train_vectors, test_vectors) in parts.items():
            quantizer = build()
            start = time.perf_counter()
            quantizer.fit(train_vectors)
            seconds += time.perf_counter() - start
            errors.append(relative_error(test_vectors, quantizer.reconstruct(test_vectors)))
            oracle = faiss_error(quantizer, train_vectors, test_vectors)
            if isinstance(oracle, tuple):
                faiss_errors.append(f"{oracle[0]:.4g}")
                faiss_seconds += oracle[1]
            else:
                faiss_errors.append(oracle)
            quantizers[part] = quantizer
        codec = MemoryQuantizer(quantizers["keys"], quantizers["values"])
        decoded = codec.decode(codec.encode(readers))
        loss, logp = held_out_loss(model, tokens, decoded)
        kl = float((exact_logp.exp() * (exact_logp - logp)).sum(-1).mean())
        code_bytes = quantizers["keys"].code_bytes
        if faiss is None:
            faiss_cells = f"{'faiss not installed':>25}"
        else:
            faiss_cells = f"{faiss_errors[0]:>12}{faiss_errors[1]:>13}"
        print(
            f"{name:<38}{code_bytes:>6}{code_bytes * PAPER_VECTORS:>12,}{errors[0]:>10.4g}"
            f"{errors[1]:>11.4g}{faiss_cells}{seconds:>7.1f}"
            f"{faiss_seconds if faiss_seconds else float('nan'):>8.1f}"
            f"{loss - exact_loss:>+10.2e}{kl:>9.1e}"
        )


if __name__ == "__main__":
    main()
