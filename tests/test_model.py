"""The model's semantics, pinned against the slow reference in `reference_model.py`.

Run on a GPU in bf16 with `scripts/check_cuda.sh` (the same tests, other `--device`/`--dtype`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_model import reference_forward

from m3.core.errors import UserError
from m3.core.memories import Memories
from m3.model.config import Config
from m3.model.memory3 import Memory3

PREFIX = [1, 2, 3]

BASE = Config(
    vocab_size=61,
    n_layer=3,
    n_head=4,
    n_kv_head=2,
    head_dim=8,
    n_embd=24,
    mlp_hidden=40,
    block_size=64,
    memory_layers=(0, 1),
    memory_tokens=3,
    chunk_length=4,
    reference_length=8,
    init_std=0.15,  # large enough that attention is far from uniform
)

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def make_model(config: Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Memory3:
    torch.manual_seed(seed)
    return Memory3(config).to(device=device, dtype=dtype).eval()


def random_bank(
    config: Config, batch: int, chunks: int, per_chunk: int, *, seed: int = 0, p_valid: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random per-chunk memories: keys/values (B, C, m, L_mem, H_kv, k, d), valid (B, C, m, k)."""
    gen = torch.Generator().manual_seed(seed)
    layers, _, heads, tokens, dim = config.memory_shape
    shape = (batch, chunks, per_chunk, layers, heads, tokens, dim)
    keys = 2.0 * torch.randn(shape, generator=gen)
    values = torch.randn(shape, generator=gen)
    valid = torch.rand(batch, chunks, per_chunk, tokens, generator=gen) < p_valid
    return keys, values, valid


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    expected = expected.to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    tolerance = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= tolerance, f"max abs error {error:.3g} > {tolerance:.3g}"


def cast(memories: Memories, device: torch.device, dtype: torch.dtype) -> Memories:
    return memories.to(device=device, dtype=dtype)


@pytest.fixture
def prefix(device: torch.device) -> torch.Tensor:
    return torch.tensor(PREFIX, device=device)


# --------------------------------------------------------------------------- warmup mode (c)
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"norm": "layernorm", "activation": "gelu"},
        {"tie_embeddings": True, "rope_base": 500.0, "n_kv_head": 4},
        {"n_kv_head": 1},
    ],
    ids=["llama", "layernorm-gelu", "tied-mha", "mqa"],
)
def test_warmup_mode_equals_plain_causal_attention(changes, device, dtype):
    config = dataclasses.replace(BASE, **changes)
    model = make_model(config, device, dtype)
    idx = torch.randint(0, config.vocab_size, (2, 11), device=device)
    assert_close(model(idx), reference_forward(model, idx), dtype)


# --------------------------------------------------------------------------- memory mode (a)
def test_one_pass_equals_per_chunk_loop_inference_layout(device, dtype, prefix):
    model = make_model(BASE, device, dtype)
    idx = torch.randint(0, BASE.vocab_size, (2, 14), device=device)  # partial last chunk
    keys, values, valid = random_bank(BASE, 2, 4, 5)
    memories = cast(Memories.per_chunk(keys, values, valid), device, dtype)
    logits = model(idx, memories, prefix=prefix)
    assert_close(logits, reference_forward(model, idx, memories, PREFIX), dtype)
    # the memories matter: the equality above is not between two memory-blind passes
    blind = model(
        idx, cast(Memories.per_chunk(keys, values, valid & False), device, dtype), prefix=prefix
    )
    assert (logits - blind).abs().max() > 0.05


def test_one_pass_equals_per_chunk_loop_training_layout(device, dtype, prefix):
    model = make_model(BASE, device, dtype, seed=1)
    idx = torch.randint(0, BASE.vocab_size, (2, 24), device=device)
    keys, values, valid = random_bank(BASE, 2, 1, 6, seed=3)
    slots = torch.tensor([[0, 1, 1, 2, 3, 5], [4, -1, 0, 0, 2, 1]])  # repeats and a miss
    memories = Memories.sliding_window(keys[:, 0], values[:, 0], valid[:, 0], slots, window=3)
    memories = cast(memories, device, dtype)
    logits = model(idx, memories, prefix=prefix)
    assert_close(logits, reference_forward(model, idx, memories, PREFIX), dtype)


def test_all_invalid_memories_are_prefix_plus_context(device, dtype, prefix):
    model = make_model(BASE, device, dtype)
    idx = torch.randint(0, BASE.vocab_size, (2, 9), device=device)
    keys, values, valid = random_bank(BASE, 2, 3, 5)
    invalid = cast(Memories.per_chunk(keys, values, torch.zeros_like(valid)), device, dtype)
    empty = Memories.empty(2, 3, memory_shape=BASE.memory_shape, device=device, dtype=dtype)
    expected = reference_forward(model, idx, empty, PREFIX)
    assert_close(model(idx, invalid, prefix=prefix), expected, dtype)
    assert_close(model(idx, empty, prefix=prefix), expected, dtype)
    # and memory mode is not warmup mode: the prefix and positions change the logits
    assert (model(idx, empty, prefix=prefix) - model(idx)).abs().max() > 1e-3


def test_gradients_through_memories_match_reference(device, prefix):
    dtype = torch.float32  # gradients are compared in float32 whatever --dtype says
    model = make_model(BASE, device, dtype)
    idx = torch.randint(0, BASE.vocab_size, (2, 10), device=device)
    keys, values, valid = random_bank(BASE, 2, 3, 2)
    valid[0, 1] = False  # a chunk with no valid memory token must not poison the gradients
    keys, values = keys.requires_grad_(), values.requires_grad_()
    memories = Memories.per_chunk(keys.to(device), values.to(device), valid.to(device))
    model(idx, memories, prefix=prefix).pow(2).sum().backward()
    ref_keys, ref_values = (
        keys.detach().double().requires_grad_(),
        values.detach().double().requires_grad_(),
    )
    reference = Memories.per_chunk(ref_keys, ref_values, valid)
    reference_forward(model, idx.cpu(), reference, PREFIX).pow(2).sum().backward()
    assert torch.isfinite(keys.grad).all() and torch.isfinite(values.grad).all()
    assert_close(keys.grad, ref_keys.grad, dtype)
    assert_close(values.grad, ref_values.grad, dtype)
    assert keys.grad.abs().max() > 0


# --------------------------------------------------------------------------- cached decoding (b)
@pytest.mark.parametrize("memory_mode", [True, False], ids=["memory", "warmup"])
def test_cached_decoding_with_swaps_equals_full_forward(memory_mode, device, dtype, prefix):
    config = BASE
    model = make_model(config, device, dtype, seed=2)
    lengths = torch.tensor([2, 7, 4, 5])  # a partial first chunk, ragged, one ends on a boundary
    steps = 9
    batch, chunk = len(lengths), config.chunk_length
    total = int(lengths.max()) + steps
    sequences = torch.randint(0, config.vocab_size, (batch, total), device=device)
    chunks = -(-total // chunk)
    keys, values, valid = random_bank(config, batch, chunks, 3, seed=5)

    cache = model.new_cache(batch, total + 1, prefix=prefix if memory_mode else None)
    prompt = sequences[:, : int(lengths.max())]
    prompt_chunks = -(-prompt.shape[1] // chunk)
    memories = None
    if memory_mode:
        bank = Memories.per_chunk(
            keys[:, :prompt_chunks], values[:, :prompt_chunks], valid[:, :prompt_chunks]
        )
        memories = cast(bank, device, dtype)
    logits = model.prefill(prompt, cache, lengths=lengths.to(device), memories=memories)
    rows = torch.arange(batch)
    stepped = {r: [logits[r, : lengths[r]]] for r in range(batch)}
    swaps = 0
    for _ in range(steps):
        if memory_mode and bool(cache.starts_chunk.any()):
            which = cache.starts_chunk.nonzero()[:, 0].cpu()
            c = cache.lengths[which].cpu() // chunk
            one = Memories.per_chunk(
                keys[which, c][:, None], values[which, c][:, None], valid[which, c][:, None]
            )
            cache.swap_memories(cast(one, device, dtype), which.to(device))
            swaps += len(which)
        position = cache.lengths.cpu()
        step_logits = model.decode(sequences[rows, position], cache)
        assert torch.isfinite(step_logits).all()
        for r in range(batch):
            stepped[r].append(step_logits[r][None])
    assert not memory_mode or swaps >= batch
    for r in range(batch):
        seq = sequences[r : r + 1, : int(lengths[r]) + steps]
        full_memories = None
        if memory_mode:
            n = -(-seq.shape[1] // chunk)
            full_memories = cast(
                Memories.per_chunk(
                    keys[r : r + 1, :n], values[r : r + 1, :n], valid[r : r + 1, :n]
                ),
                device,
                dtype,
            )
        full = model(seq, full_memories, prefix=prefix if memory_mode else None)
        # the last stepped logit predicts a token past the sequence: compare the rest
        got = torch.cat(stepped[r])[: seq.shape[1]]
        assert_close(got, full[0], dtype)


def test_the_memory_region_grows_and_decoding_equals_the_full_forward(device, dtype, prefix):
    """Decoding reads memories from the cache's memory region (one attention call); swapping in
    more memories than the prompt had grows it, and the steps still equal the one-pass forward
    and the slow reference."""
    model = make_model(BASE, device, dtype, seed=6)
    chunk = BASE.chunk_length
    idx = torch.randint(0, BASE.vocab_size, (2, 2 * chunk), device=device)
    keys, values, valid = random_bank(BASE, 2, 2, 3, seed=3)
    cache = model.new_cache(2, idx.shape[1], prefix=prefix)
    first = Memories.per_chunk(keys[:, :1, :1], values[:, :1, :1], valid[:, :1, :1])
    pieces = [model.prefill(idx[:, :chunk], cache, memories=cast(first, device, dtype))]
    assert cache.memory_slots == BASE.memory_tokens  # one memory
    one = Memories.per_chunk(keys[:, 1:], values[:, 1:], valid[:, 1:])  # three memories
    cache.swap_memories(cast(one, device, dtype))
    assert cache.memory_slots == 3 * BASE.memory_tokens
    assert cache.capacity == idx.shape[1]
    pieces += [model.decode(idx[:, t], cache)[:, None] for t in range(chunk, 2 * chunk)]
    logits = torch.cat(pieces, dim=1)
    chunk_zero_reads_one = valid.clone()
    chunk_zero_reads_one[:, 0, 1:] = False
    both = cast(Memories.per_chunk(keys, values, chunk_zero_reads_one), device, dtype)
    assert_close(logits, model(idx, both, prefix=prefix).double(), dtype)
    assert_close(logits, reference_forward(model, idx, both, PREFIX), dtype)


def test_hidden_states_are_the_blocks_outputs(device, dtype):
    model = make_model(BASE, device, dtype)
    idx = torch.randint(0, BASE.vocab_size, (2, 9), device=device)
    seen = []
    hook = model.layers[1].register_forward_hook(lambda module, args, out: seen.append(out))
    logits = model(idx)
    hook.remove()
    assert torch.equal(model.hidden_states(idx, 2), seen[0])
    assert torch.equal(model.hidden_states(idx, 0), model.embed_tokens(idx))
    assert torch.equal(model.lm_head(model.norm(model.hidden_states(idx, BASE.n_layer))), logits)


def test_chunk_by_chunk_loop_through_the_cache_equals_one_pass(device, dtype, prefix):
    """The paper's loop (each chunk appended to the cache with its own memories) = one pass."""
    model = make_model(BASE, device, dtype, seed=4)
    chunk = BASE.chunk_length
    idx = torch.randint(0, BASE.vocab_size, (2, 3 * chunk + 2), device=device)
    keys, values, valid = random_bank(BASE, 2, 4, 2, seed=9)
    full = model(idx, cast(Memories.per_chunk(keys, values, valid), device, dtype), prefix=prefix)
    cache = model.new_cache(2, idx.shape[1] + chunk, prefix=prefix)
    first = cast(Memories.per_chunk(keys[:, :1], values[:, :1], valid[:, :1]), device, dtype)
    pieces = [model.prefill(idx[:, :chunk], cache, memories=first)]
    for c in range(1, 4):
        one = Memories.per_chunk(keys[:, c : c + 1], values[:, c : c + 1], valid[:, c : c + 1])
        cache.swap_memories(cast(one, device, dtype))
        pieces.append(model.extend(idx[:, c * chunk : (c + 1) * chunk], cache))
    assert_close(torch.cat(pieces, dim=1), full.double(), dtype)
    with pytest.raises(ValueError, match="one chunk"):
        model.extend(idx[:, :3], cache)  # tokens 14..16 would span chunks 3 and 4


# --------------------------------------------------------------------------- causality (d)
@pytest.mark.parametrize("memory_mode", [True, False], ids=["memory", "warmup"])
def test_causality(memory_mode, device, dtype, prefix):
    model = make_model(BASE, device, dtype)
    idx = torch.randint(0, BASE.vocab_size, (1, 12), device=device)
    memories = None
    if memory_mode:
        memories = cast(Memories.per_chunk(*random_bank(BASE, 1, 3, 2)), device, dtype)
    kwargs = {"prefix": prefix} if memory_mode else {}
    before = model(idx, memories, **kwargs)
    changed = idx.clone()
    changed[0, 7] = (changed[0, 7] + 1) % BASE.vocab_size
    after = model(changed, memories, **kwargs)
    assert torch.equal(before[0, :7], after[0, :7])
    assert (before[0, 7:] - after[0, 7:]).abs().max() > 0


def test_a_chunks_memories_do_not_reach_earlier_tokens(device, dtype, prefix):
    model = make_model(BASE, device, dtype)
    idx = torch.randint(0, BASE.vocab_size, (1, 12), device=device)
    keys, values, valid = random_bank(BASE, 1, 3, 2)
    before = model(idx, cast(Memories.per_chunk(keys, values, valid), device, dtype), prefix=prefix)
    keys[:, 1] += 1.0  # chunk 1 = tokens 4..7
    after = model(idx, cast(Memories.per_chunk(keys, values, valid), device, dtype), prefix=prefix)
    assert torch.equal(before[0, :4], after[0, :4])
    assert (before[0, 4:8] - after[0, 4:8]).abs().max() > 0


# --------------------------------------------------------------------------- GQA grouping (e)
def test_gqa_equals_multi_head_attention_with_repeated_kv_heads(device, dtype, prefix):
    """Query head h reads key/value head h // (n_head / n_kv_head), as the paper's GQA."""
    model = make_model(BASE, device, dtype)
    mha_config = dataclasses.replace(BASE, n_kv_head=BASE.n_head)
    mha = make_model(mha_config, device, dtype)
    group = BASE.n_head // BASE.n_kv_head
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = tensor.view(BASE.n_kv_head, BASE.head_dim, -1)
            state[name] = heads.repeat_interleave(group, dim=0).reshape(-1, tensor.shape[-1])
    mha.load_state_dict(state)
    idx = torch.randint(0, BASE.vocab_size, (2, 10), device=device)
    keys, values, valid = random_bank(BASE, 2, 3, 2)
    memories = cast(Memories.per_chunk(keys, values, valid), device, dtype)
    mha_memories = cast(
        Memories.per_chunk(
            keys.repeat_interleave(group, dim=4), values.repeat_interleave(group, dim=4), valid
        ),
        device,
        dtype,
    )
    assert_close(model(idx), mha(idx).double(), dtype)
    assert_close(
        model(idx, memories, prefix=prefix), mha(idx, mha_memories, prefix=prefix).double(), dtype
    )


# --------------------------------------------------------------------------- properties (f)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    heads=st.sampled_from([(2, 1), (2, 2), (4, 2), (6, 3)]),
    chunk=st.integers(1, 5),
    length=st.integers(1, 13),
    per_chunk=st.integers(0, 3),
    tokens=st.integers(1, 4),
    batch=st.integers(1, 2),
    prefix_len=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_one_pass_equals_reference(
    heads, chunk, length, per_chunk, tokens, batch, prefix_len, seed, device, dtype
):
    config = dataclasses.replace(
        BASE,
        n_head=heads[0],
        n_kv_head=heads[1],
        chunk_length=chunk,
        memory_tokens=tokens,
        memory_layers=(1,),
        n_layer=2,
    )
    model = make_model(config, device, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)
    chunks = -(-length // chunk)
    keys, values, valid = random_bank(config, batch, chunks, per_chunk, seed=seed)
    memories = Memories.per_chunk(keys, values, valid)
    # shuffle visibility: any chunk may see any memory of the pool
    visible = torch.rand(memories.visible.shape, generator=gen) < 0.5
    memories = cast(
        Memories(memories.keys, memories.values, memories.valid, visible), device, dtype
    )
    prefix_ids = list(range(5, 5 + prefix_len))
    logits = model(idx, memories, prefix=torch.tensor(prefix_ids, device=device))
    assert_close(logits, reference_forward(model, idx, memories, prefix_ids), dtype)


# --------------------------------------------------------------------------- bad input
def test_memories_of_another_shape_are_refused_naming_the_dimension(prefix):
    model = make_model(BASE, torch.device("cpu"), torch.float32)
    idx = torch.randint(0, BASE.vocab_size, (1, 8))
    other = dataclasses.replace(BASE, head_dim=6)
    memories = Memories.per_chunk(*random_bank(other, 1, 2, 1))
    with pytest.raises(ValueError, match="head dimension"):
        model(idx, memories, prefix=prefix)
    memories = Memories.per_chunk(*random_bank(BASE, 1, 3, 1))
    with pytest.raises(ValueError, match="chunks of 4 tokens is 3, expected 2"):
        model(idx, memories, prefix=prefix)
    with pytest.raises(ValueError, match="prefix"):
        model(idx, Memories.per_chunk(*random_bank(BASE, 1, 2, 1)))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, BASE.block_size + 1, dtype=torch.long))


def test_config_reports_every_problem_at_once():
    with pytest.raises(UserError) as error:
        Config(n_head=5, n_kv_head=2, head_dim=7, memory_layers=(3, 9), n_layer=4, norm="batchnorm")
    message = str(error.value)
    for part in (
        "multiple of n_kv_head",
        "head_dim must be even",
        "memory_layers must lie",
        "norm must be",
    ):
        assert part in message
    with pytest.raises(UserError, match="unknown model preset 'huge'"):
        Config.from_name("huge")
    with pytest.raises(UserError, match="unknown model config keys"):
        Config.from_name("tiny", layers=3)


def test_paper_preset_has_the_papers_memory_shape():
    config = Config.from_name("paper-2.4b")
    assert config.memory_shape == (22, 2, 8, 8, 80)
    assert config.memory_numel * 2 == 450_560  # bytes per reference in bf16 (paper §3.3)
    assert config.memory_layers == tuple(range(22))
    assert config.n_query_groups == 5
    assert 2.4e9 < config.num_parameters - 2 * config.vocab_size * config.n_embd < 2.5e9
    assert Config.from_dict(config.to_dict()) == config


def test_parameter_count_matches_the_module():
    for name in ("tiny", "small"):
        config = Config.from_name(name)
        assert sum(p.numel() for p in Memory3(config).parameters()) == config.num_parameters
