"""`LayeredStore`: a bank with its edits' layers on top reads as the edits applied in order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backends_contract import assert_same_memory, info_for, random_memory, references_for

from m3.backends import InMemoryStore
from m3.backends.base import MissingReferenceError
from m3.backends.sharded import LayeredStore, ShardedStore
from m3.core.errors import UserError

INFO = info_for((1, 2, 2, 3, 4), "float32")


def store_of(ids: list[int], seed: int) -> InMemoryStore:
    store = InMemoryStore(INFO)
    if ids:
        store.write(
            torch.tensor(ids), random_memory(len(ids), INFO, seed=seed), references_for(ids)
        )
    return store


@st.composite
def edit_histories(draw: st.DrawFn) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """A built bank's ids and edits (ids written, ids removed), as `m3 edit` makes them."""
    built = sorted(draw(st.sets(st.integers(0, 30), max_size=12)))
    served, next_id, edits = set(built), 31, []
    for _ in range(draw(st.integers(0, 4))):
        pool = sorted(served)
        removed = draw(st.lists(st.sampled_from(pool), unique=True)) if pool else []
        kept = sorted(served - set(removed))
        rewritten = draw(st.lists(st.sampled_from(kept), unique=True)) if kept else []
        new = list(range(next_id, next_id + draw(st.integers(0, 3))))
        next_id += len(new)
        edits.append((rewritten + new, removed))
        served = (served - set(removed)) | set(rewritten) | set(new)
    return built, edits


@settings(max_examples=150, deadline=None)
@given(edit_histories())
def test_layers_read_as_the_edits_applied_in_order_to_a_dict(history) -> None:
    built, edits = history
    layers = [store_of(built, seed=0)]
    want = {i: (0, n) for n, i in enumerate(built)}  # id -> (layer, row in that layer)
    for number, (written, removed) in enumerate(edits, start=1):
        layers.append(store_of(written, seed=number))
        for i in removed:
            del want[i]
        want.update({i: (number, n) for n, i in enumerate(written)})
    store = LayeredStore(layers, [[], *(removed for _, removed in edits)])
    assert store.ids().tolist() == sorted(want) and len(store) == len(want)
    written_by = [built, *(written for written, _ in edits)]
    for i, (layer, row) in want.items():
        expected = random_memory(len(written_by[layer]), INFO, seed=layer)[torch.tensor([row])]
        assert_same_memory(store.read([i]), expected)
        assert store.references([i]) == references_for([i])
    if want:
        order = sorted(want, reverse=True)  # a read of many ids, in any order, routes each
        both = store.read(order)
        for n, i in enumerate(order):
            assert_same_memory(both[torch.tensor([n])], store.read([i]))
    gone = set().union(*(set(r) for _, r in edits)) - set(want)
    for i in sorted(gone)[:3]:
        with pytest.raises(MissingReferenceError, match=f"reference {i} is not in the bank"):
            store.read([i])
    assert store.verify() == []


def test_a_layered_store_is_read_only_and_checks_its_layers() -> None:
    store = LayeredStore([store_of([0, 1], 0), store_of([2], 1)], [[], [1]])
    with pytest.raises(UserError, match="read-only: change it with m3 edit"):
        store.delete([0])
    with pytest.raises(UserError, match="2 layers but 1 lists of removed ids"):
        LayeredStore([store_of([0], 0), store_of([1], 1)], [[]])
    other = InMemoryStore(info_for((1, 2, 2, 3, 8), "float32"))
    with pytest.raises(UserError, match="holds other memories"):
        LayeredStore([store_of([0], 0), other], [[], []])
    with pytest.raises(UserError, match="reference 0 is in two shards"):
        ShardedStore([store_of([0], 0), store_of([0], 1)])  # shards, unlike layers, never overlap
