"""The pretrained families of `recipes/pretrained/`: their real configs and small stand-ins.

`REAL` holds the architecture fields of each family's published `config.json` on the
Hugging Face Hub. Nothing is downloaded here: they were first written from knowledge of those
public files, then checked against stored public copies of them (or of the post-trained
model's, which has the same architecture), each overlay's header naming its source; no copy
of Qwen3-0.6B-Base's or SmolLM2-360M's own file was found. They are kept in this one place;
the tests check every overlay's model section against them, and `docs/guides/pretrained.md`
quotes what `m3 size` prints for the overlays.

`write_stand_in` writes a small random checkpoint of a family with transformers' own class
(tiny sizes, but the family's features: rotary scaling, biases, q/k-norm, tied
embeddings) and a tokenizer folder with the family's special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

#: family (the overlay's file name) -> the architecture fields of its public config.json.
REAL: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 24,
        "hidden_act": "silu",
    },
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "use_sliding_window": False,
        "hidden_act": "silu",
    },
    "smollm2-360m": {
        "model_type": "llama",
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    },
    "tinyllama-1.1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
    },
}

#: The Hub repository each family's weights are fetched from.
HUB = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B-Base",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
}

_FAST = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
_QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: family -> (special tokens first in the vocabulary, added after it, tokenizer_config.json).
TOKENIZERS: dict[str, tuple[list[str], list[str], dict[str, Any]]] = {
    "llama-3.2-1b": (
        [],
        ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        {**_FAST, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    ),
    "qwen2.5-0.5b": (
        [],
        _QWEN,
        {**_FAST, "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    ),
    "qwen3-0.6b": (
        [],
        _QWEN,
        {**_FAST, "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    ),
    "smollm2-360m": (
        _QWEN,
        [],
        {**_FAST, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    ),
    "tinyllama-1.1b": (
        ["<unk>", "<s>", "</s>"],
        [],
        {**_FAST, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    ),
}

#: The stand-ins' sizes, the same for every family: 2 layers, 4 heads of 8 dims.
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}

CORPUS = [
    "Memory is stored as sparse key-value pairs of the first layers.",
    "The knowledge base is cut into references of up to 128 tokens.",
    "Each chunk of the context attends to five memories and to itself.",
] * 20


def small_config(family: str) -> dict[str, Any]:
    """The family's config.json at the stand-in's sizes, its features kept."""
    config = {**REAL[family], **SMALL}
    if "rope_scaling" in config:  # the llama3 scaling must act on the short stand-in too
        config["rope_scaling"] = {**config["rope_scaling"], "original_max_position_embeddings": 64}
    if family == "qwen2.5-0.5b":
        config.pop("head_dim")  # Qwen2's head_dim is hidden_size / num_attention_heads
        config["sliding_window"] = SMALL["max_position_embeddings"]
    return config


def write_stand_in(family: str, folder: Path) -> Path:
    """Write a small random checkpoint of `family`, with its tokenizer, into `folder`."""
    import torch
    import transformers

    config = small_config(family)
    model_type = config["model_type"]
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    config_class, model_class = classes[model_type]
    fields = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = model_class(config_class(**fields))
    if model_type == "qwen2":  # random, non-zero biases, so that their loading is seen
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    first, after, tokenizer_config = TOKENIZERS[family]
    bpe(CORPUS, first, after).save(str(folder / "tokenizer.json"))
    text = json.dumps(tokenizer_config, indent=2)
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return folder


def bpe(
    corpus: list[str], first: list[str], after: list[str] = (), adds_bos: str | None = None
) -> Any:
    """A byte-level BPE with special tokens at ids 0.. (`first`) or after the vocabulary.

    Args:
        corpus: Lines to train it on.
        first: Special tokens at ids 0, 1, ….
        after: Special tokens appended after the learnt vocabulary (as Qwen's are).
        adds_bos: A token the tokenizer puts in front of every text itself (Llama 3's
            post-processor); None for none.

    Returns:
        The `tokenizers.Tokenizer`.
    """
    import tokenizers as tk

    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=first,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus, trainer=trainer)
    if after:
        hf.add_special_tokens(list(after))
    if adds_bos:
        hf.post_processor = tk.processors.TemplateProcessing(
            single=f"{adds_bos} $A",
            pair=f"{adds_bos} $A {adds_bos} $B",
            special_tokens=[(adds_bos, hf.token_to_id(adds_bos))],
        )
    return hf
