"""The architectures of the families people start from: Llama 3.x, Qwen2 / Qwen2.5, Qwen3.

Two halves. First each family's options in m3's own model (biases, per-head q/k norms,
scaled rotary embeddings), against the slow float64 reference (`reference_model`), in warmup
and in memory mode, and the three ways of running memory mode (one pass, the per-chunk loop
through the cache, cached decoding with memory swaps) against each other. Then real
checkpoints: each family's transformers class writes a small random checkpoint, m3 loads it,
and the warmup logits are transformers' to 1e-4 in float32 over a context longer than the
original max positions; the loaded model passes the memory-mode checks too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from reference_model import reference_forward
from test_model import BASE, PREFIX, assert_close, cast, random_bank

from m3.core.errors import UserError
from m3.core.memories import Memories
from m3.memory.encoder import MemoryEncoder
from m3.model.checkpoints import config_from_hf, load_hf_checkpoint, save_hf_checkpoint
from m3.model.config import Config
from m3.model.memory3 import Memory3
from m3.model.rope import RopeScaling

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "llama3.1-scaled": {"rope_scaling": LLAMA3, "rope_base": 500.0},
    "llama-attention-bias": {"attention_bias": True, "rope_scaling": {**LLAMA3, "factor": 2.0}},
    "qwen2.5-tied-qkv-bias": {"qkv_bias": True, "tie_embeddings": True, "n_kv_head": 1},
    "qwen2.5-yarn": {"qkv_bias": True, "rope_scaling": YARN},
    "qwen3-qk-norm": {"qk_norm": True, "head_dim": 12, "tie_embeddings": True},
    "qwen3-bias-linear": {
        "qk_norm": True,
        "attention_bias": True,
        "rope_scaling": {"rope_type": "linear", "factor": 3.0},
    },
}


def family_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Memory3:
    """A model of the family with every weight random: biases and norm weights too."""
    config = dataclasses.replace(BASE, **FAMILIES[name])
    model = Memory3(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if pname.endswith(".bias"):
                param.copy_(0.3 * noise)
            elif param.dim() == 1:
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(noise * 0.15)
    return model.to(device=device, dtype=dtype).eval()


@pytest.fixture
def prefix(device: torch.device) -> torch.Tensor:
    return torch.tensor(PREFIX, device=device)


# ----------------------------------------------------------------------------- the options
def test_default_options_leave_the_config_dict_and_parameters_as_they_were() -> None:
    plain = Config.from_name("tiny")
    assert not {"rope_scaling", "attention_bias", "qkv_bias", "qk_norm"} & set(plain.to_dict())
    assert Config.from_dict(plain.to_dict()) == plain
    names = {n for n, _ in Memory3(plain).named_parameters()}
    assert not any(n.endswith((".bias", "q_norm.weight", "k_norm.weight")) for n in names)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "llama"])
def test_options_round_trip_and_count_their_parameters(name: str) -> None:
    config = dataclasses.replace(BASE, **FAMILIES[name])
    data = config.to_dict()
    for key, value in FAMILIES[name].items():
        assert data[key] == value
    assert Config.from_dict(data) == config
    assert isinstance(hash(config), int)  # still a frozen, hashable config
    model = Memory3(config)
    assert config.num_parameters == sum(p.numel() for p in model.parameters())
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if config.attention_bias:
        assert len(biases) == 4 * config.n_layer
    elif config.qkv_bias:
        assert len(biases) == 3 * config.n_layer and not any("o_proj" in n for n in biases)
    else:
        assert not biases


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "rope_type 'longrope' is not supported"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "beta_fast": 3}},
            r"beta_fast is not a parameter of 'llama3'.*low_freq_factor is required",
        ),
        ({"rope_scaling": {"rope_type": "linear", "factor": -1}}, "factor must be a positive"),
        ({"attention_bias": True, "qkv_bias": True}, "not both"),
        ({"qk_norm": "yes"}, "qk_norm must be true or false"),
    ],
    ids=["dynamic", "longrope", "wrong-keys", "negative", "both-biases", "not-bool"],
)
def test_bad_options_are_refused_by_name(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        Config(**fields)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_warmup_mode_equals_the_reference(name, device, dtype):
    model = family_model(name, device, dtype)
    idx = torch.randint(0, BASE.vocab_size, (2, 40), device=device)  # past 16 original positions
    assert_close(model(idx), reference_forward(model, idx), dtype)


def test_the_scalings_change_the_logits_past_the_original_positions(device):
    """Control: the comparisons above see the scaling (and yarn's attention factor)."""
    idx = torch.randint(0, BASE.vocab_size, (1, 40), device=device)
    for name in ("llama3.1-scaled", "qwen2.5-yarn", "qwen3-bias-linear"):
        model = family_model(name, device, torch.float32)
        plain = Memory3(dataclasses.replace(model.config, rope_scaling=None)).to(device)
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (model(idx) - plain.eval()(idx)).abs().max() > 1e-2, name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_memory_mode_one_pass_equals_the_per_chunk_reference(name, device, dtype, prefix):
    model = family_model(name, device, dtype, seed=1)
    idx = torch.randint(0, BASE.vocab_size, (2, 30), device=device)  # partial last chunk
    keys, values, valid = random_bank(model.config, 2, 8, 3, seed=2)
    memories = cast(Memories.per_chunk(keys, values, valid), device, dtype)
    logits = model(idx, memories, prefix=prefix)
    assert_close(logits, reference_forward(model, idx, memories, PREFIX), dtype)


def chunk_loop_and_decoding(model: Memory3, prefix: torch.Tensor, dtype: torch.dtype) -> None:
    """One pass = the paper's loop through the cache = cached decoding with memory swaps."""
    config, device = model.config, prefix.device
    chunk = config.chunk_length
    length = 5 * chunk + 2
    idx = torch.randint(0, config.vocab_size, (2, length), device=device)
    chunks = -(-length // chunk)
    keys, values, valid = random_bank(config, 2, chunks, 2, seed=9)
    bank = cast(Memories.per_chunk(keys, values, valid), device, dtype)
    full = model(idx, bank, prefix=prefix)

    def memories_of(c: int) -> Memories:
        one = Memories.per_chunk(keys[:, c : c + 1], values[:, c : c + 1], valid[:, c : c + 1])
        return cast(one, device, dtype)

    # the per-chunk loop: each chunk appended to the cache with its own memories
    cache = model.new_cache(2, length, prefix=prefix)
    pieces = [model.prefill(idx[:, :chunk], cache, memories=memories_of(0))]
    for c in range(1, chunks):
        cache.swap_memories(memories_of(c))
        pieces.append(model.extend(idx[:, c * chunk : (c + 1) * chunk], cache))
    assert_close(torch.cat(pieces, dim=1), full.double(), dtype)

    # cached decoding, one token at a time, swapping memories at every chunk start
    cache = model.new_cache(2, length, prefix=prefix)
    prompt = chunk + 1
    two = Memories.per_chunk(keys[:, :2], values[:, :2], valid[:, :2])  # a prompt of 2 chunks
    pieces = [model.prefill(idx[:, :prompt], cache, memories=cast(two, device, dtype))]
    swaps = 0
    for t in range(prompt, length):
        if bool(cache.starts_chunk.all()):
            cache.swap_memories(memories_of(t // chunk))
            swaps += 1
        pieces.append(model.decode(idx[:, t], cache)[:, None])
    assert swaps == chunks - 2
    assert_close(torch.cat(pieces, dim=1), full.double(), dtype)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_memory_mode_chunk_loop_and_cached_decoding_equal_one_pass(name, device, dtype, prefix):
    chunk_loop_and_decoding(family_model(name, device, dtype, seed=4), prefix, dtype)


@pytest.mark.parametrize("name", ["qwen2.5-yarn", "qwen3-bias-linear"])
def test_memories_store_attended_keys_and_select_with_pre_rope_queries_and_keys(name, prefix):
    """Stored keys: after bias, q/k-norm and the scaled RoPE at the reference's positions.
    Selection: queries and keys after bias and q/k-norm, before RoPE (paper §3.3)."""
    model = family_model(name, prefix.device, torch.float32, seed=5)
    refs = torch.randint(0, BASE.vocab_size, (2, 8), device=prefix.device)
    lengths = torch.tensor([8, 6], device=prefix.device)
    captured: list[list[tuple[torch.Tensor, ...]]] = []
    idx = torch.cat([prefix.expand(2, -1), refs], dim=1)
    reference_forward(model, idx, capture=captured)
    dense = MemoryEncoder()(model, refs, lengths, prefix=prefix)
    width = len(PREFIX)
    for j, layer in enumerate(model.config.memory_layers):
        for row in range(2):
            q_raw, k_raw, k_rot, v = captured[row][layer]
            got = dense.keys[row, j].transpose(0, 1)  # (T, H_kv, d)
            assert_close(got, k_rot[width:], torch.float32)
            assert_close(dense.values[row, j].transpose(0, 1), v[width:], torch.float32)
            n = int(lengths[row])
            group = model.config.n_query_groups
            scores = torch.stack(
                [
                    torch.logsumexp(
                        torch.cat(
                            [
                                q_raw[width : width + n, h * group + g] @ k_raw[width + t, h]
                                for g in range(group)
                            ]
                        )
                        / math.sqrt(model.config.head_dim),
                        dim=0,
                    )
                    for h in range(model.config.n_kv_head)
                    for t in range(n)
                ]
            ).view(model.config.n_kv_head, n)
            assert_close(dense.scores[row, j][:, :n], scores, torch.float32)


def test_rope_scaling_is_parsed_once_into_a_typed_value() -> None:
    config = Config(rope_scaling=YARN)
    assert isinstance(config.rope_scaling, RopeScaling)
    assert config.rope_scaling.cos_sin_factor == pytest.approx(0.1 * math.log(4.0) + 1)
    assert Config(rope_scaling=config.rope_scaling) == config


# ----------------------------------------------------------------------------- checkpoints
HF_SMALL: dict[str, Any] = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
HF_LLAMA3 = {**LLAMA3, "rope_type": "llama3"}
HF_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3.1": ("llama", dict(rope_scaling=HF_LLAMA3, rope_theta=500.0, head_dim=8)),
    "llama-bias-linear": (
        "llama",
        dict(attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "smollm2-tied": ("llama", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2.5-tied-2kv-sharded": (
        "qwen2",
        dict(tie_word_embeddings=True, num_attention_heads=8, head_dim=4, rope_theta=1e6),
    ),
    "qwen2.5-yarn": ("qwen2", dict(rope_scaling={"type": "yarn", **YARN}, head_dim=8)),
    "qwen3": ("qwen3", dict(head_dim=12, tie_word_embeddings=True)),
    "qwen3-bias-yarn": (
        "qwen3",
        dict(head_dim=8, attention_bias=True, rope_scaling={**YARN, "beta_fast": 8.0}),
    ),
}


def write_family(directory: Path, name: str) -> torch.nn.Module:
    """A random checkpoint written by the family's own transformers class."""
    import transformers
    from test_checkpoints import randomise

    model_type, fields = HF_FAMILIES[name]
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
    config = getattr(transformers, f"{prefix}Config")(
        **{**HF_SMALL, **fields}, attn_implementation="eager"
    )
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    randomise(model, seed=len(name))
    model.eval()
    model.save_pretrained(directory, **({"max_shard_size": "8KB"} if "sharded" in name else {}))
    return model


@pytest.mark.parametrize("name", list(HF_FAMILIES))
def test_checkpoint_logits_equal_transformers_past_the_original_positions(
    tmp_path: Path, name: str
) -> None:
    hf = write_family(tmp_path / name, name)
    if "sharded" in name:
        assert (tmp_path / name / "model.safetensors.index.json").is_file()
    model = load_hf_checkpoint(tmp_path / name).eval()
    model_type, fields = HF_FAMILIES[name]
    config = model.config
    assert config.qkv_bias == (model_type == "qwen2")
    assert config.qk_norm == (model_type == "qwen3")
    assert config.attention_bias == fields.get("attention_bias", False)
    assert config.tie_embeddings == fields.get("tie_word_embeddings", False)
    scaling = fields.get("rope_scaling")
    assert (config.rope_scaling is None) == (scaling is None)
    if scaling:
        assert config.rope_scaling.rope_type == scaling.get("rope_type", scaling.get("type"))
    idx = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(idx).logits, model(idx)
    assert expected.abs().max() > 1  # logits that say something
    error = (got - expected).abs().max().item()
    print(f"{name}: max abs logit difference {error:.2e}")
    assert error <= 1e-4
    # and the comparison sees the scaling: without it, the logits past position 16 differ
    if scaling:
        plain = Memory3(dataclasses.replace(config, rope_scaling=None)).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain(idx) - expected)[:, 16:].abs().max() > 1e-2


#: yarn's attention factor, each way config.json can set it (the plain yarn is above).
YARN_FACTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-mscale": ("Qwen2", {"mscale": 1.0, "mscale_all_dim": 0.5}),
    "llama-mscale-beta": ("Llama", {"mscale": 0.8, "mscale_all_dim": 1.2, "beta_fast": 16.0}),
    "qwen2-attention-factor": ("Qwen2", {"attention_factor": 0.75}),
    "llama-mscale-alone": ("Llama", {"mscale": 2.0}),  # without mscale_all_dim: from factor
}


@pytest.mark.parametrize("name", list(YARN_FACTORS))
def test_yarn_attention_factor_equals_transformers_past_the_original_positions(
    tmp_path: Path, name: str
) -> None:
    """yarn's mscale / mscale_all_dim / attention_factor branch against transformers' class:
    the same factor on cosines and sines, the same logits to 1e-4 over 48 > 16 positions."""
    import transformers
    from test_checkpoints import randomise

    prefix, extra = YARN_FACTORS[name]
    # factor = max_position_embeddings / original, as a consistent config.json has it
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, **extra}
    config = getattr(transformers, f"{prefix}Config")(
        **{**HF_SMALL, "head_dim": 8, "rope_scaling": yarn}, attn_implementation="eager"
    )
    hf = getattr(transformers, f"{prefix}ForCausalLM")(config)
    randomise(hf, seed=3)
    hf.eval().save_pretrained(tmp_path / name)
    model = load_hf_checkpoint(tmp_path / name).eval()
    scaling = model.config.rope_scaling
    assert scaling is not None and scaling.rope_type == "yarn"
    factor = scaling.cos_sin_factor
    assert factor == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-6)
    own = "attention_factor" in extra or "mscale_all_dim" in extra  # else: from factor alone
    assert (factor == pytest.approx(0.1 * math.log(4.0) + 1)) != own
    idx = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(idx).logits, model(idx)
    error = (got - expected).abs().max().item()
    print(f"{name}: attention factor {factor:.6f}, max abs logit difference {error:.2e}")
    assert error <= 1e-4
    if not own:
        return
    # control: the plain yarn factor on the same weights gives other logits
    plain = {k: v for k, v in yarn.items() if k not in ("mscale", "mscale_all_dim")}
    plain.pop("attention_factor", None)
    other = Memory3(dataclasses.replace(model.config, rope_scaling=plain)).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (other(idx) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(HF_FAMILIES))
def test_loaded_checkpoints_agree_with_themselves_in_memory_mode(tmp_path: Path, name: str):
    write_family(tmp_path / name, name)
    model = load_hf_checkpoint(
        tmp_path / name,
        memory_layers=(0, 1),
        memory_tokens=3,
        chunk_length=4,
        reference_length=8,
    ).eval()
    prefix = torch.tensor(PREFIX)
    idx = torch.randint(0, 101, (2, 22), generator=torch.Generator().manual_seed(1))
    keys, values, valid = random_bank(model.config, 2, 6, 3, seed=2)
    memories = Memories.per_chunk(keys, values, valid)
    with torch.no_grad():
        logits = model(idx, memories, prefix=prefix)
        assert_close(logits, reference_forward(model, idx, memories, PREFIX), torch.float32)
        chunk_loop_and_decoding(model, prefix, torch.float32)


@pytest.mark.parametrize("name", ["llama3.1-scaled", "qwen2.5-yarn", "qwen3-bias-linear"])
def test_saved_families_load_in_transformers_with_the_same_logits(tmp_path: Path, name: str):
    from transformers import AutoModelForCausalLM

    model = family_model(name, torch.device("cpu"), torch.float32, seed=7)
    save_hf_checkpoint(model, tmp_path / name)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / name, attn_implementation="eager")
    expected = {"llama3.1-scaled": "Llama", "qwen2.5-yarn": "Qwen2", "qwen3-bias-linear": "Qwen3"}
    assert type(hf).__name__ == f"{expected[name]}ForCausalLM"
    idx = torch.randint(0, BASE.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, model(idx), atol=1e-4, rtol=0)
    loaded = load_hf_checkpoint(tmp_path / name)
    assert loaded.config == model.config


def test_a_bad_checkpoint_is_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    write_family(tmp_path / "ckpt", "qwen2.5-yarn")
    config_path = tmp_path / "ckpt" / "config.json"
    hf = json.loads(config_path.read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(hf.get(key), dict):
            hf[key] = {**hf[key], "rope_type": "dynamic", "type": "dynamic"}
    config_path.write_text(json.dumps(hf))
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    with pytest.raises(UserError, match=rf"{config_path}: .*rope_type 'dynamic' is not supported"):
        load_hf_checkpoint(tmp_path / "ckpt")
    config_path.write_text(json.dumps({**hf, "model_type": "smollm3"}))
    with pytest.raises(UserError, match=rf"{config_path}: model_type 'smollm3'.*skip RoPE"):
        load_hf_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before  # nothing written
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(
        json.dumps({**hf, "rope_scaling": None, "rope_parameters": None})
    )
    with pytest.raises(UserError, match=rf"{empty}: no weights found: expected model\.safetensors"):
        load_hf_checkpoint(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["config.json"]


def test_qwen_sliding_window_caps_the_context_only_when_used() -> None:
    base = {"model_type": "qwen2", **HF_SMALL, "sliding_window": 24, "max_window_layers": 1}
    assert config_from_hf(base).block_size == 64  # use_sliding_window is false by default
    assert config_from_hf({**base, "use_sliding_window": True}).block_size == 24
    full = {**base, "use_sliding_window": True, "layer_types": ["full_attention"] * 3}
    assert config_from_hf(full).block_size == 64
    assert config_from_hf({"model_type": "qwen3", **HF_SMALL}).head_dim == 128  # Qwen3's default
