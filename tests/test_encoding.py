"""The write path: encoder and sparsifier against slow references written here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_model import reference_forward

from m3.core.errors import UserError
from m3.core.memories import Memories
from m3.memory.encoder import DenseMemory, MemoryEncoder, encode_references
from m3.memory.sparsifier import TopKSparsifier
from m3.model.config import Config
from m3.model.memory3 import Memory3

PREFIX = [1, 2, 3]
CONFIG = Config(
    vocab_size=53, n_layer=4, n_head=4, n_kv_head=2, head_dim=8, n_embd=24, mlp_hidden=40,
    block_size=64, memory_layers=(0, 2), memory_tokens=3, chunk_length=4, reference_length=12,
    init_std=0.3,
)  # fmt: skip


def make_model(seed: int = 0, **changes) -> Memory3:
    torch.manual_seed(seed)
    model = Memory3(dataclasses.replace(CONFIG, **changes)).eval()
    return model.requires_grad_(False)


def padded(references: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in references])
    tokens = torch.zeros(len(references), int(lengths.max()), dtype=torch.long)
    for row, ref in enumerate(references):
        tokens[row, : len(ref)] = torch.tensor(ref)
    return tokens, lengths


def slow_log_scores(q, k, scored, *, groups, score, reduction):
    """q (S, H, d), k (S, H_kv, d) before RoPE; scored: positions used -> {(kv, j): log w}."""
    out = {}
    dim = q.shape[-1]
    for kv in range(k.shape[1]):
        for j in scored:
            per_head = []
            for h in range(kv * groups, (kv + 1) * groups):
                total = 0.0
                for i in scored:
                    s_ij = float(q[i, h] @ k[j, kv]) / math.sqrt(dim)
                    if score == "softmax":
                        row = sum(
                            math.exp(float(q[i, h] @ k[m, kv]) / math.sqrt(dim)) for m in scored
                        )
                        total += math.exp(s_ij) / row
                    else:
                        total += math.exp(s_ij)
                per_head.append(total)
            combined = {"sum": sum(per_head), "mean": sum(per_head) / groups, "max": max(per_head)}
            out[kv, j] = math.log(combined[reduction])
    return out


@pytest.mark.parametrize(
    ("score", "reduction", "exclude_prefix"),
    [("exp", "sum", True), ("exp", "mean", True), ("exp", "max", False), ("softmax", "sum", True)],
)
def test_encoder_matches_the_papers_formula(score, reduction, exclude_prefix):
    model = make_model()
    references = [[5, 9, 11, 7, 7], list(range(20, 32)), [40], [13, 14, 15, 16, 17, 18, 19, 8]]
    tokens, lengths = padded(references)
    encoder = MemoryEncoder(score=score, head_reduction=reduction, exclude_prefix=exclude_prefix)
    dense = encoder(model, tokens, lengths, prefix=torch.tensor(PREFIX))
    width, groups = len(PREFIX), CONFIG.n_head // CONFIG.n_kv_head
    for row, ref in enumerate(references):
        capture = []
        reference_forward(model, torch.tensor([PREFIX + ref]), capture=capture)
        n = len(ref)
        scored = list(range(width, width + n)) if exclude_prefix else list(range(1, width + n))
        for j_layer, layer in enumerate(CONFIG.memory_layers):
            q_raw, k_raw, k_rot, v = capture[0][layer]
            # keys after RoPE at positions b.., as memory mode expects them
            assert torch.allclose(
                dense.keys[row, j_layer, :, :n].double(), k_rot[width:].transpose(0, 1), atol=1e-5
            )
            assert torch.allclose(
                dense.values[row, j_layer, :, :n].double(), v[width:].transpose(0, 1), atol=1e-5
            )
            expected = slow_log_scores(
                q_raw, k_raw, scored, groups=groups, score=score, reduction=reduction
            )
            for (kv, j), value in expected.items():
                if j >= width:
                    got = float(dense.scores[row, j_layer, kv, j - width])
                    assert abs(got - value) < 1e-4 * max(1.0, abs(value)), (row, layer, kv, j)
            assert torch.isinf(dense.scores[row, j_layer, :, n:]).all()


def test_batching_and_padding_do_not_change_a_reference_memory():
    model = make_model(seed=1)
    references = [[4, 5, 6], list(range(10, 22)), [7, 8, 9, 10, 11, 12]]
    together = encode_references(model, references, prefix=PREFIX, batch_size=2)
    for row, ref in enumerate(references):
        alone = encode_references(model, [ref], prefix=PREFIX)
        assert torch.equal(alone.positions[0], together.positions[row])
        assert torch.allclose(alone.keys[0], together.keys[row], atol=1e-5)
        assert torch.allclose(alone.values[0], together.values[row], atol=1e-5)
    assert together.valid.sum(1).tolist() == [3, 3, 3]


def test_stored_memory_is_the_models_own_attention_state():
    """A sparse memory read in memory mode equals attending to the same K/V built by hand."""
    model = make_model(seed=2)
    reference = [30, 31, 32, 33, 34, 35, 36]
    memory = encode_references(model, [reference], prefix=PREFIX)
    capture = []
    reference_forward(model, torch.tensor([PREFIX + reference]), capture=capture)
    width = len(PREFIX)
    for j_layer, layer in enumerate(CONFIG.memory_layers):
        _, _, k_rot, v = capture[0][layer]
        for head in range(CONFIG.n_kv_head):
            for slot in range(CONFIG.memory_tokens):
                position = int(memory.positions[0, j_layer, head, slot])
                expected = k_rot[width + position, head]
                assert torch.allclose(
                    memory.keys[0, j_layer, head, slot].double(), expected, atol=1e-5
                )
                assert torch.allclose(
                    memory.values[0, j_layer, head, slot].double(),
                    v[width + position, head],
                    atol=1e-5,
                )
    pool = Memories.from_references(memory, torch.tensor([[0, -1]]))
    assert pool.valid[0, 0].all() and not pool.valid[0, 1].any()


def test_gradients_flow_through_the_selected_keys_and_values():
    model = make_model(seed=3).requires_grad_(True)
    memory = encode_references(model, [[5, 6, 7, 8, 9], [10, 11]], prefix=PREFIX)
    (memory.keys.pow(2).sum() + memory.values.pow(2).sum()).backward()
    last = CONFIG.memory_layers[-1]
    attn = model.layers[last].self_attn
    assert attn.k_proj.weight.grad.abs().sum() > 0 and attn.v_proj.weight.grad.abs().sum() > 0
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # layers after the last memory layer take no part in the write path
    assert model.layers[last + 1].self_attn.q_proj.weight.grad is None


def test_bad_references_are_refused():
    model = make_model()
    with pytest.raises(UserError, match="at most 12 tokens"):
        encode_references(model, [list(range(13))], prefix=PREFIX)
    with pytest.raises(UserError, match="empty reference"):
        encode_references(model, [[1, 2], []], prefix=PREFIX)
    with pytest.raises(UserError, match="no references"):
        encode_references(model, [], prefix=PREFIX)
    with pytest.raises(UserError, match="head_reduction"):
        MemoryEncoder(head_reduction="median")


@settings(max_examples=80, deadline=None)
@given(
    count=st.integers(1, 3),
    length=st.integers(1, 9),
    k=st.integers(1, 6),
    levels=st.integers(1, 4),  # few distinct score values: many ties
    seed=st.integers(0, 10_000),
)
def test_top_k_sparsifier_keeps_exactly_the_top_k(count, length, k, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    layers, heads, dim = 2, 3, 4
    lengths = torch.randint(1, length + 1, (count,), generator=gen)
    scores = torch.randint(0, levels, (count, layers, heads, length), generator=gen).float()
    scores = scores.masked_fill(torch.arange(length) >= lengths[:, None, None, None], float("-inf"))
    keys = torch.randn(count, layers, heads, length, dim, generator=gen)
    dense = DenseMemory(keys=keys, values=-keys, scores=scores, lengths=lengths)
    sparse = TopKSparsifier(k)(dense)
    assert sparse.keys.shape == (count, layers, heads, k, dim)
    for r in range(count):
        n = int(lengths[r])
        assert sparse.valid[r].tolist() == [s < min(n, k) for s in range(k)]
        for layer in range(layers):
            for head in range(heads):
                s = scores[r, layer, head]
                # slow reference: sort by (score descending, position ascending), take k
                best = sorted(range(n), key=lambda j: (-float(s[j]), j))[:k]
                kept = sparse.positions[r, layer, head].tolist()
                assert kept[: min(n, k)] == sorted(best)
                assert all(p == -1 for p in kept[min(n, k) :])
                for slot, position in enumerate(kept[: min(n, k)]):
                    assert torch.equal(
                        sparse.keys[r, layer, head, slot], keys[r, layer, head, position]
                    )
                    assert torch.equal(
                        sparse.values[r, layer, head, slot], -keys[r, layer, head, position]
                    )
