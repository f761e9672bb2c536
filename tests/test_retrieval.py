"""The retriever: search, leakage filter with over-fetching, LRU cache, batching, checks."""

from __future__ import annotations

import pickle
import random
import string
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.backends.base import StoreInfo
from m3.backends.exact_index import ExactIndex
from m3.backends.hdf5_store import HDF5Store
from m3.backends.in_memory import InMemoryStore
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Reference
from m3.data.tokenizer import ByteTokenizer
from m3.memory.encoder import encode_references
from m3.model.config import Config
from m3.model.memory3 import Memory3
from m3.retrieval.cache import LRUCache
from m3.retrieval.embedders import HashedNgramEmbedder
from m3.retrieval.retriever import Retriever

CONFIG = Config(
    vocab_size=259, n_layer=2, n_head=2, n_kv_head=1, head_dim=8, n_embd=16, mlp_hidden=32,
    block_size=512, memory_layers=(0, 1), memory_tokens=4, chunk_length=64, reference_length=128,
    init_std=0.3,
)  # fmt: skip
TOKENIZER = ByteTokenizer()
COMMON = ["river", "stone", "market", "lamp", "garden", "winter"]
_RNG = random.Random(0)


def _word() -> str:
    return "".join(_RNG.choice(string.ascii_lowercase) for _ in range(_RNG.randint(4, 8)))


# Random words, ~100 bytes: a ~40-byte query can never exceed 2/3 of a reference, and two
# references overlap by at most ~0.5 (byte-level LCS), so only verbatim quotes leak.
RARE = [(_word(), _word()) for _ in range(30)]
TEXTS = [
    " ".join([RARE[i][0], *(_word() for _ in range(5)), COMMON[i % 6], RARE[i][1]])
    + " "
    + " ".join([*(_word() for _ in range(5)), COMMON[(i + 1) % 6]])
    for i in range(30)
]
K = 5


def make_model(seed: int = 0) -> Memory3:
    torch.manual_seed(seed)
    return Memory3(CONFIG).eval().requires_grad_(False)


@cache
def knowledge_base() -> tuple[Memory3, list[list[int]], SparseMemory, HashedNgramEmbedder]:
    model = make_model()
    references = [TOKENIZER.encode(text) for text in TEXTS]
    memory = encode_references(model, references, prefix=TOKENIZER.reference_prefix())
    embedder = HashedNgramEmbedder(dim=4096)
    embedder.fit(TEXTS)
    return model, references, memory, embedder


def store_info(model: Memory3) -> StoreInfo:
    return StoreInfo(
        memory_shape=CONFIG.memory_shape,
        dtype="float32",
        model_fingerprint=model.memory_fingerprint(),
        tokenizer_fingerprint=TOKENIZER.fingerprint(),
        reference_prefix=tuple(TOKENIZER.reference_prefix()),
    )


def fill(store: InMemoryStore | HDF5Store) -> None:
    _, references, memory, _ = knowledge_base()
    rows = [Reference(f"doc{i}", 0, len(ids), tuple(ids)) for i, ids in enumerate(references)]
    store.write(torch.arange(len(TEXTS)), memory, rows)


def make_index() -> ExactIndex:
    _, _, _, embedder = knowledge_base()
    index = ExactIndex(embedder.dim, metric="cosine")
    index.add(embedder.embed(TEXTS), torch.arange(len(TEXTS)))
    return index


def make_retriever(store: InMemoryStore | HDF5Store | None = None, **changes) -> Retriever:
    model, _, _, embedder = knowledge_base()
    if store is None:
        store = InMemoryStore(store_info(model))
        fill(store)
    settings_ = dict(
        embedder=embedder,
        index=make_index(),
        store=store,
        tokenizer=TOKENIZER,
        model=model,
        k=K,
        expected_embedder_fingerprint=embedder.fingerprint(),
    )
    settings_.update(changes)
    return Retriever(**settings_)


def query(i: int, filler: str = "") -> str:
    return f"{filler}something about {RARE[i][0]} and {RARE[i][1]}"


def context(*parts: str) -> list[int]:
    return [TOKENIZER.bos_id, *TOKENIZER.encode(" ".join(parts))]


# ----------------------------------------------------------------------- search + memories


def test_a_chunk_with_a_references_rare_words_retrieves_it_first() -> None:
    retriever = make_retriever()
    found = retriever.retrieve([[query(i) for i in (3, 17, 29)], [query(8)]])
    assert found.ids.shape == (2, 3, K)
    assert found.ids[0, :, 0].tolist() == [3, 17, 29]
    assert found.ids[1, 0, 0].item() == 8
    assert (found.ids[1, 1:] == -1).all()  # row 1 has one chunk: the rest is padding
    assert (found.scores[0, :, :-1] >= found.scores[0, :, 1:]).all()


def test_returned_memories_are_the_stores_bit_for_bit() -> None:
    retriever = make_retriever()
    found = retriever.retrieve([[query(4), query(11)], [query(20), query(4)]])
    memories = found.memories
    assert memories.num_memories == 2 * K and memories.num_chunks == 2
    for b in range(2):
        for c in range(2):
            ids = found.ids[b, c]
            stored = retriever.store.read(ids)
            pool = slice(c * K, c * K + K)
            assert torch.equal(memories.keys[b, pool], stored.keys)
            assert torch.equal(memories.values[b, pool], stored.values)
            assert torch.equal(memories.valid[b, pool], stored.valid)


def test_the_visibility_map_gives_each_chunk_exactly_its_own_k() -> None:
    found = make_retriever().retrieve([[query(i) for i in range(4)], [query(9)]])
    owner = torch.arange(4 * K) // K
    expected = owner[None, :] == torch.arange(4)[:, None]
    assert found.memories.visible.shape == (2, 4, 4 * K)
    assert torch.equal(found.memories.visible[0], expected)
    assert torch.equal(found.memories.visible[1], expected)
    # padding chunks of row 1 see only invalid slots
    assert not found.memories.valid[1, K:].any()


# ----------------------------------------------------------------------- leakage filter


def test_a_leaking_best_hit_is_dropped_and_the_next_hits_fill_k() -> None:
    # the context quotes reference 12 verbatim; its last chunk's leak text, the whole context,
    # contains it (the first chunk's, 64 of its ~100 tokens, cannot exceed 2/3 of it)
    ctx = context(TEXTS[12])
    unfiltered = make_retriever(threshold=None).retrieve_context([ctx])
    filtered = make_retriever().retrieve_context([ctx])
    assert unfiltered.ids[0, -1, 0].item() == 12
    top = make_retriever(threshold=None, k=K + 1).retrieve_context([ctx]).ids[0, -1]
    assert filtered.ids[0, -1].tolist() == [i for i in top.tolist() if i != 12][:K]
    assert filtered.ids[0, 0, 0].item() == 12
    assert (filtered.ids >= 0).all()


def test_wider_searches_keep_k_when_every_first_candidate_leaks() -> None:
    _, references, _, _ = knowledge_base()
    leaked = list(range(K))
    leak_text = [tok for i in leaked for tok in references[i]]
    chunk = " ".join(f"{RARE[i][0]} {RARE[i][1]}" for i in leaked)
    retriever = make_retriever(overfetch=1)
    found = retriever.retrieve([[chunk]], leak_texts=[leak_text])
    kept = found.ids[0, 0].tolist()
    assert len(kept) == K and min(kept) >= 0
    assert not set(kept) & set(leaked)
    assert set(make_retriever(threshold=None).retrieve([[chunk]]).ids[0, 0].tolist()) & set(leaked)


def test_threshold_none_keeps_leaking_references() -> None:
    found = make_retriever(threshold=None).retrieve_context([context(TEXTS[12])])
    assert found.ids[0, -1, 0].item() == 12


def test_fewer_than_k_clean_references_leave_minus_one() -> None:
    _, references, _, _ = knowledge_base()
    everything = [tok for ids in references for tok in ids]
    found = make_retriever().retrieve([[query(2)]], leak_texts=[everything])
    assert (found.ids == -1).all()
    assert not found.memories.valid.any()


# ----------------------------------------------------------------------- LRU cache


class SlowLRU:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.order, self.values = capacity, [], {}
        self.hits = self.misses = 0

    def get(self, key: int):
        if key not in self.values:
            self.misses += 1
            return None
        self.hits += 1
        self.order.remove(key)
        self.order.append(key)
        return self.values[key]

    def put(self, key: int, value) -> None:
        if self.capacity == 0:
            return
        if key in self.values:
            self.order.remove(key)
        self.order.append(key)
        self.values[key] = value
        if len(self.order) > self.capacity:
            del self.values[self.order.pop(0)]


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(0, 6),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10)), max_size=60),
)
def test_lru_cache_matches_a_slow_reference(capacity: int, ops: list[tuple[bool, int]]) -> None:
    fast, slow = LRUCache(capacity), SlowLRU(capacity)
    for is_put, key in ops:
        if is_put:
            fast.put(key, key * 10)
            slow.put(key, key * 10)
        else:
            assert fast.get(key) == slow.get(key)
        assert fast.keys() == slow.order
    stats = fast.stats()
    assert (stats.hits, stats.misses, stats.size) == (slow.hits, slow.misses, len(slow.order))


def test_lru_cache_evicts_the_least_recently_used_first() -> None:
    cache_ = LRUCache(2)
    cache_.put(1, "a")
    cache_.put(2, "b")
    assert cache_.get(1) == "a"  # 2 is now the least recently used
    cache_.put(3, "c")
    assert cache_.keys() == [1, 3] and cache_.get(2) is None


def test_the_retriever_reads_only_missing_ids_and_counts_hits() -> None:
    retriever = make_retriever()
    reads: list[list[int]] = []
    read = retriever.store.read
    retriever.store.read = lambda ids: (reads.append(list(map(int, ids))), read(ids))[1]
    first = retriever.retrieve([[query(5)]])
    assert retriever.cache_stats().misses == K and retriever.cache_stats().hits == 0
    again = retriever.retrieve([[query(5)]])
    stats = retriever.cache_stats()
    assert (stats.hits, stats.misses, stats.size) == (K, K, K) and stats.hit_rate == 0.5
    assert len(reads) == 1 and sorted(reads[0]) == sorted(first.ids[0, 0].tolist())
    assert torch.equal(first.memories.keys, again.memories.keys)
    retriever.reset_cache()
    assert retriever.cache_stats() == (0, 0, 0, retriever.cache_stats().capacity, 0.0)


def test_a_cache_of_size_zero_changes_nothing_but_the_counters() -> None:
    on, off = make_retriever(), make_retriever(cache_size=0)
    for _ in range(2):
        a, b = on.retrieve([[query(1), query(2)]]), off.retrieve([[query(1), query(2)]])
        assert torch.equal(a.ids, b.ids) and torch.equal(a.memories.keys, b.memories.keys)
    assert off.cache_stats().hits == 0 and off.cache_stats().size == 0
    assert on.cache_stats().hits > 0


# ----------------------------------------------------------------------- batching + decoding


def test_batched_retrieval_equals_separate_calls() -> None:
    rows = [
        [query(1), query(7, RARE[2][0] + " "), query(13), query(25)],
        [query(4), query(4), query(19), query(0, RARE[12][1] + " ")],
    ]
    batched_retriever = make_retriever(group_size=3)  # 8 chunks: the overlapped path
    batched = batched_retriever.retrieve(rows)
    single = make_retriever()
    for b, row in enumerate(rows):
        so_far: list[int] = []
        for c, chunk in enumerate(row):
            so_far = so_far + TOKENIZER.encode(chunk)
            one = single.retrieve([[chunk]], leak_texts=[so_far])
            assert torch.equal(one.ids[0, 0], batched.ids[b, c])
            assert torch.equal(one.scores[0, 0], batched.scores[b, c])
            mine = batched.memories.for_chunks(torch.full((len(rows),), c))
            other = one.memories
            assert torch.equal(mine.keys[b], other.keys[0])
            assert torch.equal(mine.values[b], other.values[0])
            assert torch.equal(mine.valid[b], other.valid[0])
    assert batched_retriever.cache_stats().misses == len(set(batched.ids.flatten().tolist()))


def test_the_one_chunk_decoding_path_equals_the_batched_path() -> None:
    contexts = [
        context(query(3), "filler words " * 6, query(22)),  # ends mid-chunk
        context(TEXTS[6], query(14), "x" * 20)[:128],  # exactly two chunks
        context(query(9)),
    ]
    retriever = make_retriever()
    batched = retriever.retrieve_context(contexts)
    step = make_retriever().retrieve_next(contexts)
    last = torch.tensor([(len(ids) - 1) // 64 for ids in contexts])
    rows = torch.arange(len(contexts))
    assert step.ids.shape == (3, 1, K)
    assert torch.equal(step.ids[:, 0], batched.ids[rows, last])
    expected = batched.memories.for_chunks(last)
    for field in ("keys", "values", "valid", "visible"):
        assert torch.equal(getattr(step.memories, field), getattr(expected, field)), field


def test_retrieval_from_an_hdf5_store_matches_the_in_memory_store(tmp_path: Path) -> None:
    model = knowledge_base()[0]
    with HDF5Store(tmp_path / "bank.h5", info=store_info(model), mode="w") as store:
        fill(store)
        store.mark_complete()
    reader = HDF5Store(tmp_path / "bank.h5")
    rows = [[query(i) for i in range(6)], [query(i) for i in range(10, 16)]]
    from_file = make_retriever(reader, group_size=2).retrieve(rows)
    from_ram = make_retriever().retrieve(rows)
    assert torch.equal(from_file.ids, from_ram.ids)
    assert torch.equal(from_file.memories.keys, from_ram.memories.keys)
    assert torch.equal(from_file.memories.values, from_ram.memories.values)
    retriever = pickle.loads(pickle.dumps(make_retriever(reader, group_size=2)))
    assert torch.equal(retriever.retrieve(rows).ids, from_ram.ids)
    reader.close()


# ----------------------------------------------------------------------- checks


def test_an_embedder_other_than_the_indexs_is_refused_naming_both() -> None:
    other = HashedNgramEmbedder(dim=4096)  # not fitted: another fingerprint
    expected = knowledge_base()[3].fingerprint()
    with pytest.raises(UserError) as error:
        make_retriever(embedder=other)
    assert expected[:16] in str(error.value) and other.fingerprint()[:16] in str(error.value)
    with pytest.raises(UserError, match="embedder"):
        make_retriever(
            expected_embedder_fingerprint=None, manifest={"embedder": {"fingerprint": "0" * 64}}
        )
    make_retriever(
        expected_embedder_fingerprint=None, manifest={"embedder": {"fingerprint": expected}}
    )
    with pytest.raises(UserError, match="no embedder fingerprint"):
        make_retriever(expected_embedder_fingerprint=None, manifest={"shards": []})


def test_a_model_other_than_the_stores_writer_is_refused() -> None:
    with pytest.raises(UserError, match="rebuild the memory bank"):
        make_retriever(model=make_model(seed=1))


def test_k_larger_than_the_store_is_refused() -> None:
    with pytest.raises(UserError, match="holds only 30"):
        make_retriever(k=31)


def test_bad_settings_are_refused() -> None:
    for change in ({"k": 0}, {"overfetch": 0}, {"cache_size": -1}, {"threshold": 1.5}):
        with pytest.raises(UserError):
            make_retriever(**change)


def test_search_finds_what_retrieve_finds_without_reading_memories() -> None:
    chunks = [query(3), context(TEXTS[6]), query(17, "filler words ")]
    retriever = make_retriever()
    ids, scores = retriever.search(chunks)
    found = make_retriever().retrieve([[chunk] for chunk in chunks])
    assert torch.equal(ids, found.ids[:, 0]) and torch.equal(scores, found.scores[:, 0])
    assert retriever.cache_stats().misses == 0  # no memory was looked up
    # a chunk that quotes a reference verbatim does not get it back
    assert 6 not in ids[1].tolist()
