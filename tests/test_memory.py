"""The memory container: layouts, visibility maps and validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.core.memories import Memories

SHAPE = (2, 1, 3, 2)  # L_mem, H_kv, k, d_h


def bank(
    batch: int, count: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, count, *SHAPE, generator=gen)
    valid = torch.rand(batch, count, SHAPE[2], generator=gen) < 0.7
    return keys, -keys, valid


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    chunks=st.integers(1, 9),
    count=st.integers(1, 6),
    window=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_sliding_window_visibility_matches_a_loop(batch, chunks, count, window, seed):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, count, (batch, chunks), generator=gen)
    keys, values, valid = bank(batch, count)
    visible = Memories.sliding_window(keys, values, valid, slots, window=window).visible
    for b in range(batch):
        for c in range(chunks):
            seen = {int(slots[b, j]) for j in range(max(0, c - window + 1), c + 1)} - {-1}
            assert {m for m in range(count) if visible[b, c, m]} == seen


def test_per_chunk_layout_is_block_diagonal():
    keys = torch.randn(2, 3, 4, *SHAPE)
    memories = Memories.per_chunk(keys, keys, torch.ones(2, 3, 4, SHAPE[2], dtype=torch.bool))
    assert memories.num_memories == 12 and memories.num_chunks == 3
    expected = torch.block_diag(*[torch.ones(1, 4, dtype=torch.bool)] * 3)
    assert torch.equal(memories.visible[1], expected)
    assert torch.equal(memories.keys[:, 4:8], keys[:, 1])


def test_for_chunks_gathers_exactly_the_visible_memories():
    keys, values, valid = bank(2, 5, seed=1)
    visible = torch.tensor(
        [[[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], [[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]], dtype=torch.bool
    )
    memories = Memories(keys, values, valid, visible)
    picked = memories.for_chunks(torch.tensor([0, 0]))
    assert picked.num_chunks == 1 and picked.num_memories == 3
    assert torch.equal(picked.keys[0, :2], keys[0, [0, 2]])
    assert not picked.valid[0, 2].any()  # padding slot of row 0
    assert torch.equal(picked.keys[1], keys[1, [1, 2, 3]])
    nothing = memories.for_chunks(torch.tensor([1, 1]))
    assert not nothing.valid[1].any() and torch.equal(nothing.keys[0, 0], keys[0, 4])


def test_pool_padding_adds_invisible_invalid_memories():
    keys, values, valid = bank(1, 2)
    memories = Memories(keys, values, valid, torch.ones(1, 1, 2, dtype=torch.bool))
    padded = memories.with_pool_size(4)
    assert padded.num_memories == 4
    assert not padded.valid[:, 2:].any() and not padded.visible[..., 2:].any()
    with pytest.raises(ValueError, match="cannot shrink"):
        memories.with_pool_size(1)


def test_malformed_containers_are_refused_with_the_expected_shape():
    keys, values, valid = bank(1, 2)
    with pytest.raises(ValueError, match=r"\(B, M, L_mem, H_kv, k, d_h\)"):
        Memories(keys[0], values[0], valid, torch.ones(1, 1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        Memories(keys, values, valid.float(), torch.ones(1, 1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="visible must be a bool tensor"):
        Memories(keys, values, valid, torch.ones(1, 1, 3, dtype=torch.bool))
