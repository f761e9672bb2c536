"""Hugging Face Llama-family checkpoints: m3 against transformers' own definition of Llama.

Every checkpoint is written here, from small random models; transformers is the oracle for
the logits (its eager attention, not SDPA, so that it shares no kernel with m3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from m3.core.errors import UserError
from m3.model.checkpoints import (
    config_from_hf,
    config_to_hf,
    load_hf_checkpoint,
    load_hf_state_dict,
    load_hf_weights,
    save_hf_checkpoint,
)
from m3.model.config import Config
from m3.model.memory3 import Memory3

VOCAB = 101
SMALL: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attn_implementation="eager",
)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights of order one, so that attention is far from uniform and RoPE matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(noise * 1.5 / math.sqrt(param.shape[-1]))


def write_hf(directory: Path, *, mistral: bool = False, shard: str | None = None, **fields: Any):
    """A random transformers model of the given config, saved in `directory`."""
    kwargs = {**SMALL, **fields}
    if mistral:
        model = MistralForCausalLM(MistralConfig(**kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    randomise(model, seed=len(directory.name))
    model.eval()
    if shard:
        model.save_pretrained(directory, max_shard_size=shard)
    else:
        model.save_pretrained(directory)
    return model


def tokens(length: int, *, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


CASES = {
    "gqa-untied-theta5000": dict(rope_theta=5000.0),
    "mha-tied-head_dim12": dict(num_key_value_heads=4, head_dim=12, tie_word_embeddings=True),
    "mqa-gelu-theta1e6": dict(num_key_value_heads=1, hidden_act="gelu", rope_theta=1e6),
    "sharded": dict(shard="8KB", rope_theta=20000.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_llama(tmp_path: Path, case: str) -> None:
    fields = dict(CASES[case])
    hf = write_hf(tmp_path / case, **fields)
    if case == "sharded":
        assert (tmp_path / case / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / case).glob("model-*.safetensors"))) > 3
    model = load_hf_checkpoint(tmp_path / case).eval()
    config = model.config
    assert (config.n_head, config.n_kv_head) == (4, fields.get("num_key_value_heads", 2))
    assert config.head_dim == fields.get("head_dim", 8)
    assert config.rope_base == fields.get("rope_theta", 10000.0)
    assert config.tie_embeddings == fields.get("tie_word_embeddings", False)
    if config.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    idx = tokens(48)
    with torch.no_grad():
        expected = hf(idx).logits
        got = model(idx)
    assert expected.abs().max() > 1  # logits that say something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_the_comparison_sees_the_rotary_convention(tmp_path: Path) -> None:
    """Control: the same weights in the interleaved (Meta) order give other logits."""
    hf = write_hf(tmp_path / "ckpt", rope_theta=5000.0)
    model = load_hf_checkpoint(tmp_path / "ckpt").eval()
    head_dim = model.config.head_dim
    half = torch.arange(head_dim // 2)
    interleave = torch.stack([half, half + head_dim // 2], dim=1).flatten()
    with torch.no_grad():
        for block in model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj):
                heads = proj.weight.view(-1, head_dim, proj.weight.shape[1])
                heads.copy_(heads[:, interleave])
        idx = tokens(48)
        difference = (model(idx) - hf(idx).logits).abs().max()
    assert difference > 0.1


def test_mistral_with_its_sliding_window_as_block_size(tmp_path: Path) -> None:
    hf = write_hf(tmp_path / "mistral", mistral=True, sliding_window=24, head_dim=8)
    model = load_hf_checkpoint(tmp_path / "mistral").eval()
    assert model.config.block_size == 24  # up to the window, sliding = plain causal attention
    idx = tokens(24)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="sliding_window 24"):
        load_hf_checkpoint(tmp_path / "mistral", block_size=32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_model_loads_in_transformers_with_the_same_logits(tmp_path: Path, tied: bool) -> None:
    config = Config.from_name("tiny", vocab_size=VOCAB, tie_embeddings=tied, rope_base=2000.0)
    model = Memory3(config).eval()
    randomise(model, seed=3)
    save_hf_checkpoint(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tied
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    idx = tokens(40)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact(tmp_path: Path, tied: bool) -> None:
    config = Config.from_name(
        "tiny",
        tie_embeddings=tied,
        activation="gelu",
        memory_layers=(1, 3),
        memory_tokens=4,
        reference_length=96,
        context_offset=100,
    )
    model = Memory3(config)
    randomise(model, seed=5)
    save_hf_checkpoint(model, tmp_path / "rt")
    loaded = load_hf_checkpoint(tmp_path / "rt")
    assert loaded.config == config
    original, back = model.state_dict(), loaded.state_dict()
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
        assert back[name].dtype == torch.float32
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    # the default context_offset follows reference_length when it is overridden
    plain = Memory3(Config.from_name("tiny", tie_embeddings=tied))
    save_hf_checkpoint(plain, tmp_path / "plain")
    assert load_hf_checkpoint(tmp_path / "plain").config == plain.config
    assert config_from_hf(tmp_path / "plain", reference_length=64).context_offset == 64


def test_dtypes_are_kept_or_converted(tmp_path: Path) -> None:
    model = Memory3(Config.from_name("tiny"))
    save_hf_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_hf_checkpoint(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.rotary.inv_freq.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    widened = load_hf_checkpoint(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in widened.parameters()} == {torch.float32}


def test_load_hf_weights_into_an_existing_model(tmp_path: Path) -> None:
    hf = write_hf(tmp_path / "ckpt", tie_word_embeddings=True)
    arch = config_from_hf(tmp_path / "ckpt")
    config = Config(**{**arch.to_dict(), "memory_layers": (2,), "block_size": 32, "name": "mine"})
    model = Memory3(config).eval()
    load_hf_weights(model, tmp_path / "ckpt")
    assert model.lm_head.weight is model.embed_tokens.weight
    idx = tokens(32)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)

    other = Memory3(Config(**{**arch.to_dict(), "rope_base": 500.0, "mlp_hidden": 64}))
    with pytest.raises(UserError) as error:
        load_hf_weights(other, tmp_path / "ckpt")
    assert "mlp_hidden: 48 (the model has 64)" in str(error.value)
    assert "rope_base: 10000.0 (the model has 500.0)" in str(error.value)


def test_config_defaults_are_transformers_defaults() -> None:
    minimal = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,  # Mistral's default num_key_value_heads is 8
    )
    for model_type, hf_class in (("llama", LlamaConfig), ("mistral", MistralConfig)):
        config = config_from_hf({"model_type": model_type, **minimal})
        hf = hf_class(**minimal)
        assert config.n_kv_head == hf.num_key_value_heads
        assert config.head_dim == (getattr(hf, "head_dim", None) or 64 // 8)
        assert config.norm_eps == hf.rms_norm_eps
        rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}  # 5 or 4
        assert config.rope_base == rope["rope_theta"]
        assert config.tie_embeddings == hf.tie_word_embeddings
        assert config.activation == hf.hidden_act
        window = getattr(hf, "sliding_window", None) or math.inf
        assert config.block_size == min(hf.max_position_embeddings, window)
        assert config.memory_layers == (0, 1)  # m3's default: the first half


def test_memory_settings_are_overrides_and_architecture_is_not() -> None:
    hf = {"model_type": "llama", **{k: v for k, v in SMALL.items() if k != "attn_implementation"}}
    config = config_from_hf(hf, memory_layers=range(3), memory_tokens=4, block_size=32)
    assert (config.memory_layers, config.memory_tokens, config.block_size) == ((0, 1, 2), 4, 32)
    with pytest.raises(UserError, match=r"cannot override \['n_layer'\].*fixed by the checkpoint"):
        config_from_hf(hf, n_layer=2)
    with pytest.raises(UserError, match="cannot override"):
        config_from_hf(hf, memory_layer=(0,))
    with pytest.raises(UserError, match=r"memory_layers must lie in 0\.\.2"):
        config_from_hf(hf, memory_layers=(5,))


# ----------------------------------------------------------------------------- refusals
def base_config() -> dict[str, Any]:
    return config_to_hf(Config.from_name("tiny"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
            r"config: cannot load .*rope_scaling: rope_type 'dynamic' is not supported",
        ),
        (
            {"rope_scaling": None, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
            r"rope_parameters\.factor is required for 'llama3'",
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}},
            "rope_parameters: rope_type 'longrope' is not supported",
        ),
        ({"attention_bias": True, "mlp_bias": True}, "mlp_bias is true, but m3.s MLP is bias-free"),
        ({"model_type": "smollm3"}, "model_type 'smollm3' is not supported: its layers skip RoPE"),
        (
            {"model_type": "gemma"},
            r"model_type 'gemma' is not supported.*\['llama', 'mistral', 'qwen2', 'qwen3'\]",
        ),
        ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_theta": 123.0}, "rope_theta 123.0 and rope_parameters.rope_theta 10000.0"),
        ({"hidden_size": None, "vocab_size": None}, r"missing \['hidden_size', 'vocab_size'\]"),
        (
            {
                "mlp_bias": True,
                "hidden_act": "gelu_new",
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "short_factor": 2},
            },
            r"mlp_bias is true.*hidden_act 'gelu_new'.*rope_scaling\.short_factor is not a "
            "parameter of 'yarn'",
        ),
    ],
    ids=[
        "rope-dynamic",
        "rope-llama3-incomplete",
        "rope-longrope",
        "mlp-bias",
        "smollm3",
        "gemma",
        "tanh-gelu",
        "partial-rope",
        "theta-disagree",
        "missing",
        "all-at-once",
    ],
)
def test_refuses_what_m3_cannot_compute(change: dict[str, Any], message: str) -> None:
    hf = {**base_config(), **change}
    hf = {k: v for k, v in hf.items() if v is not None or k == "rope_scaling"}
    with pytest.raises(UserError, match=message):
        config_from_hf(hf)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"config\.json: not found.*model\.safetensors"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON config"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(base_config()))
    with pytest.raises(UserError, match=r"no weights found: expected model\.safetensors, or"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"found \['pytorch_model\.bin'\].*safetensors only"):
        load_hf_checkpoint(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"lists shards .*\['model-00002-of-00002\.safetensors'\]"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_hf_checkpoint(tmp_path)


def test_every_mismatched_tensor_is_reported_at_once(tmp_path: Path) -> None:
    model = Memory3(Config.from_name("tiny"))
    save_hf_checkpoint(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    weights["model.extra.weight"] = torch.zeros(3)
    save_file(weights, tmp_path / "model.safetensors")
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 128  # the weights have 192
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError) as error:
        load_hf_checkpoint(tmp_path)
    message = str(error.value)
    assert "(14 problems)" in message
    assert "missing tensor layers.2.mlp.up_proj.weight (128, 64)" in message
    assert "bias layers.0.self_attn.q_proj.bias (64,): m3's layers are bias-free" in message
    assert "unexpected tensor extra.weight (3,)" in message
    for layer in range(4):
        assert (
            f"layers.{layer}.mlp.down_proj.weight: checkpoint has shape (64, 192), "
            "m3 expects (64, 128)"
        ) in message
        assert f"layers.{layer}.mlp.gate_proj.weight: checkpoint has shape (192, 64)" in message
    assert message.count("up_proj.weight: checkpoint has shape (192, 64)") == 3


def test_untied_checkpoint_without_head_is_refused_and_stored_inv_freq_ignored(
    tmp_path: Path,
) -> None:
    model = Memory3(Config.from_name("tiny"))
    save_hf_checkpoint(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = model.rotary.inv_freq
    save_file(weights, tmp_path / "model.safetensors")
    state = load_hf_state_dict(tmp_path, model.config)
    assert state.keys() == model.state_dict().keys()
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"missing tensor lm_head\.weight \(512, 64\)"):
        load_hf_state_dict(tmp_path, model.config)


def test_save_refuses_layernorm_and_sharded_folders(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"norm='layernorm'.*RMSNorm only"):
        save_hf_checkpoint(Memory3(Config.from_name("tiny", norm="layernorm")), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UserError, match="holds a sharded checkpoint"):
        save_hf_checkpoint(Memory3(Config.from_name("tiny")), tmp_path)
