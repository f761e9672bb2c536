"""Diagnostics: attention share on memories (against the slow reference), kept tokens as text."""

from __future__ import annotations

import dataclasses

import torch
from reference_model import reference_forward
from test_model import BASE, PREFIX, make_model, random_bank

from m3.core.memories import Memories
from m3.data.tokenizer import ByteTokenizer
from m3.inference.diagnostics import kept_tokens, memory_attention
from m3.memory.encoder import encode_references
from m3.memory.sparsifier import TopKSparsifier


def test_memory_share_equals_the_reference_softmax_mass() -> None:
    model = make_model(BASE, torch.device("cpu"), torch.float64)
    idx = torch.randint(0, BASE.vocab_size, (2, 14))
    keys, values, valid = random_bank(BASE, 2, 4, 5)
    memories = Memories.per_chunk(keys, values, valid).to(dtype=torch.float64)
    prefix = torch.tensor(PREFIX)
    shares = memory_attention(model, idx, memories, prefix=prefix)
    layers = len(BASE.memory_layers)
    assert shares.shape == (layers, 2, BASE.n_head, 14)
    expected = torch.zeros(layers, 2, BASE.n_head, 14, dtype=torch.float64)
    reference_forward(model, idx, memories, PREFIX, shares=expected)
    torch.testing.assert_close(shares.double(), expected, atol=1e-6, rtol=0)
    assert 0.05 < shares.mean() < 0.95  # memories and context both take part
    # recording leaves the model as it was
    assert all(layer.self_attn.memory_shares is None for layer in model.layers)


def test_no_valid_memory_gets_no_attention() -> None:
    model = make_model(BASE, torch.device("cpu"), torch.float32)
    idx = torch.randint(0, BASE.vocab_size, (1, 9))
    keys, values, valid = random_bank(BASE, 1, 3, 2)
    memories = Memories.per_chunk(keys, values, valid & False)
    shares = memory_attention(model, idx, memories, prefix=torch.tensor(PREFIX))
    assert shares.abs().max() < 1e-6


def test_kept_tokens_are_the_sparsifiers_choice_as_text() -> None:
    tokenizer = ByteTokenizer()
    config = dataclasses.replace(BASE, vocab_size=259, reference_length=32)
    model = make_model(config, torch.device("cpu"), torch.float32)
    text = "Ada was born in Tarsville."
    ids = tokenizer.encode(text)
    memory = encode_references(
        model, [ids], prefix=tokenizer.reference_prefix(), sparsifier=TopKSparsifier(3)
    )
    shown = kept_tokens(memory[0], ids, tokenizer)
    assert len(shown) == len(config.memory_layers) and len(shown[0]) == config.n_kv_head
    for layer, heads in enumerate(shown):
        for head, tokens in enumerate(heads):
            positions = memory.positions[0, layer, head].tolist()
            assert tokens == [text[p] for p in positions if p >= 0]
            assert len(tokens) == 3
