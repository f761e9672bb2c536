"""Evaluation: batched cloze and held-out scoring against slow one-row references."""

from __future__ import annotations

import math
import random
import string
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.backends.base import StoreInfo
from m3.backends.exact_index import ExactIndex
from m3.backends.in_memory import InMemoryStore
from m3.core.errors import UserError
from m3.core.memories import Memories
from m3.data.chunking import Reference
from m3.data.tokenizer import ByteTokenizer
from m3.data.world import ClozeQuestion
from m3.inference.evaluate import evaluate_cloze, evaluate_heldout, wilson_interval
from m3.inference.rag import rag_prefixes
from m3.inference.scoring import scored_continuations
from m3.memory.encoder import encode_references
from m3.model.config import Config
from m3.model.memory3 import Memory3
from m3.retrieval.embedders import HashedNgramEmbedder
from m3.retrieval.retriever import Retriever

CONFIG = Config(
    vocab_size=259, n_layer=2, n_head=2, n_kv_head=1, head_dim=8, n_embd=16, mlp_hidden=32,
    block_size=2048, memory_layers=(0, 1), memory_tokens=4, chunk_length=64, reference_length=128,
    init_std=0.3,
)  # fmt: skip
TOKENIZER = ByteTokenizer()
_RNG = random.Random(3)


def _word() -> str:
    return "".join(_RNG.choice(string.ascii_lowercase) for _ in range(_RNG.randint(4, 7)))


NAMES = [_word().capitalize() for _ in range(12)]
TOWNS = [_word().capitalize() for _ in range(12)]
FACTS = [f"{name} was born in {town}." for name, town in zip(NAMES, TOWNS, strict=True)]
QUESTIONS = [
    ClozeQuestion(
        prompt=f"The home town of {name} is",
        options=tuple(f" {TOWNS[(i + j) % 12]}" for j in range(4)),
        answer=0,
        entity=name,
        attribute="birthplace",
        kb_ids=(f"doc{i}",),
    )
    for i, name in enumerate(NAMES)
]


@cache
def setup() -> tuple[Memory3, Retriever]:
    torch.manual_seed(0)
    model = Memory3(CONFIG).eval().requires_grad_(False)
    ids = [TOKENIZER.encode(text) for text in FACTS]
    memory = encode_references(model, ids, prefix=TOKENIZER.reference_prefix())
    info = StoreInfo(
        memory_shape=CONFIG.memory_shape,
        dtype="float32",
        model_fingerprint=model.memory_fingerprint(),
        tokenizer_fingerprint=TOKENIZER.fingerprint(),
        reference_prefix=tuple(TOKENIZER.reference_prefix()),
    )
    store = InMemoryStore(info)
    rows = [Reference(f"doc{i}", 0, len(r), tuple(r)) for i, r in enumerate(ids)]
    store.write(torch.arange(len(FACTS)), memory, rows)
    embedder = HashedNgramEmbedder(dim=1024)
    embedder.fit(FACTS)
    index = ExactIndex(embedder.dim, metric="cosine")
    index.add(embedder.embed(FACTS), torch.arange(len(FACTS)))
    retriever = Retriever(
        embedder=embedder, index=index, store=store, tokenizer=TOKENIZER, model=model, k=3,
        threshold=None, expected_embedder_fingerprint=embedder.fingerprint(),
    )  # fmt: skip
    return model, retriever


# ------------------------------------------------------------------ slow references


def slow_option_scores(model: Memory3, context: list[int], option: list[int], memories) -> float:
    """One row at a time: the option's summed log-probabilities after its context."""
    idx = torch.tensor([context + option])
    chunks = math.ceil(idx.shape[1] / CONFIG.chunk_length)
    if memories is None:
        memories = Memories.empty(1, chunks, memory_shape=CONFIG.memory_shape)
    else:
        memories = Memories(
            memories.keys,
            memories.values,
            memories.valid,
            torch.ones(1, chunks, memories.keys.shape[1], dtype=torch.bool),
        )
    prefix = torch.tensor(TOKENIZER.reference_prefix())
    logp = torch.log_softmax(model(idx, memories, prefix=prefix).double(), -1)[0]
    return sum(float(logp[len(context) + t - 1, tok]) for t, tok in enumerate(option))


def slow_accuracy(model: Memory3, retriever: Retriever, mode: str, order: list[int]) -> float:
    correct = 0
    for q, question in enumerate(QUESTIONS):
        context = [TOKENIZER.bos_id, *TOKENIZER.encode(question.prompt)]
        memories = None
        if mode in ("memory", "shuffled"):
            source = QUESTIONS[order[q]]
            # each question retrieves alone: the batched call must not mix rows
            found = retriever.retrieve([[source.prompt]]).ids[0, 0]
            kept = found[found >= 0]
            memories = Memories.from_references(
                retriever.store.read(kept), torch.arange(len(kept))[None]
            )
        if mode == "rag":
            before = rag_prefixes(retriever, TOKENIZER, [question.prompt])[0]
            context = [context[0], *before, *context[1:]]
        scores = [
            slow_option_scores(model, context, TOKENIZER.encode(o), memories)
            for o in question.options
        ]
        correct += int(max(range(4), key=scores.__getitem__) == question.answer)
    return correct / len(QUESTIONS)


# ----------------------------------------------------------------------------- cloze


def slow_warmup_scores(model: Memory3, context: list[int], option: list[int]) -> float:
    """One row at a time in warmup mode: no prefix, no memories."""
    logp = torch.log_softmax(model(torch.tensor([context + option])).double(), -1)[0]
    return sum(float(logp[len(context) + t - 1, tok]) for t, tok in enumerate(option))


@given(
    st.lists(
        st.tuples(
            st.integers(0, 150),  # context tokens after <s>: up to 3 chunks of 64
            st.lists(st.integers(1, 20), min_size=1, max_size=4),  # continuation lengths
            st.integers(0, len(FACTS) - 1),  # the reference the row reads
        ),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["memory", "empty", "warmup"]),
    st.integers(0, 2**16),
)
@settings(max_examples=30, deadline=None)
def test_continuations_sharing_their_context_score_as_full_rows(rows, mode, seed) -> None:
    """One prefill and decoding from copies of the cache = every full row read alone."""
    model, retriever = setup()
    rng = random.Random(seed)
    contexts = [[TOKENIZER.bos_id, *(rng.randrange(3, 259) for _ in range(n))] for n, _, _ in rows]
    options = [[[rng.randrange(3, 259) for _ in range(m)] for m in sizes] for _, sizes, _ in rows]
    read = torch.tensor([ref for _, _, ref in rows])
    memories = None
    if mode == "memory":  # one reference per row, seen by every chunk of it
        memories = Memories.from_references(
            retriever.store.read(read), torch.arange(len(rows))[:, None]
        )
    prefix = None if mode == "warmup" else torch.tensor(TOKENIZER.reference_prefix())
    fast = scored_continuations(model, contexts, options, memories, prefix)
    for r, (context, row_options) in enumerate(zip(contexts, options, strict=True)):
        one = None if memories is None else memories.take_rows(torch.tensor([r]))
        slow = [
            slow_warmup_scores(model, context, o) if mode == "warmup"
            else slow_option_scores(model, context, o, one)
            for o in row_options
        ]  # fmt: skip
        assert fast[r].tolist() == pytest.approx(slow, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("mode", ["memory", "none", "rag"])
def test_batched_cloze_equals_one_row_at_a_time(mode: str) -> None:
    model, retriever = setup()
    fast = evaluate_cloze(
        model, TOKENIZER, QUESTIONS, retriever=retriever, modes=[mode], batch_size=5
    )
    slow = slow_accuracy(model, retriever, mode, list(range(len(QUESTIONS))))
    assert fast[mode].accuracy == pytest.approx(slow)
    assert fast[mode].questions == len(QUESTIONS) and fast[mode].chance == 0.25


def test_without_memory_in_warmup_mode_reads_no_prefix() -> None:
    """`without_memory="warmup"`: the `none` mode reads the model as a warmup stage does."""
    model, _ = setup()
    warmup = evaluate_cloze(
        model, TOKENIZER, QUESTIONS, modes=["none"], batch_size=5, without_memory="warmup"
    )["none"]
    correct = 0
    for question in QUESTIONS:
        context = [TOKENIZER.bos_id, *TOKENIZER.encode(question.prompt)]
        scores = []
        for option in question.options:
            ids = TOKENIZER.encode(option)
            logp = torch.log_softmax(model(torch.tensor([context + ids])).double(), -1)[0]
            scores.append(sum(float(logp[len(context) + t - 1, tok]) for t, tok in enumerate(ids)))
        correct += int(max(range(4), key=scores.__getitem__) == question.answer)
    assert warmup.accuracy == pytest.approx(correct / len(QUESTIONS))
    ids = TOKENIZER.encode(TEXTS[0])
    windows = [[TOKENIZER.bos_id, *ids[s : s + 150]] for s in range(0, len(ids), 150)]
    heldout = evaluate_heldout(
        model, TOKENIZER, TEXTS[:1], modes=["none"], protocols=["paper"], seq_length=150,
        without_memory="warmup",
    )["paper"]["none"]  # fmt: skip
    total = count = 0
    for w in windows:
        logp = torch.log_softmax(model(torch.tensor([w])).double(), -1)[0]
        total -= sum(float(logp[t - 1, w[t]]) for t in range(1, len(w)))
        count += len(w) - 1
    assert heldout.loss == pytest.approx(total / count, rel=1e-5)
    empty = evaluate_heldout(
        model, TOKENIZER, TEXTS[:1], modes=["none"], protocols=["paper"], seq_length=150
    )["paper"]["none"]
    assert empty.loss != pytest.approx(heldout.loss)  # the prefix and positions differ


def test_shuffled_control_reads_another_questions_memories() -> None:
    model, retriever = setup()
    fast = evaluate_cloze(
        model, TOKENIZER, QUESTIONS, retriever=retriever, modes=["shuffled"], seed=5
    )
    order = torch.randperm(len(QUESTIONS), generator=torch.Generator().manual_seed(5)).tolist()
    assert fast["shuffled"].accuracy == pytest.approx(
        slow_accuracy(model, retriever, "shuffled", order)
    )


def test_memories_change_the_scores() -> None:
    # a mutation check: the memory mode must read something the none mode does not
    model, retriever = setup()
    context = [TOKENIZER.bos_id, *TOKENIZER.encode(QUESTIONS[0].prompt)]
    found = retriever.retrieve([[QUESTIONS[0].prompt]]).ids[0, 0]
    memories = Memories.from_references(retriever.store.read(found), torch.arange(3)[None])
    option = TOKENIZER.encode(QUESTIONS[0].options[0])
    with_memory = slow_option_scores(model, context, option, memories)
    assert with_memory != pytest.approx(slow_option_scores(model, context, option, None))


def test_cloze_bad_input() -> None:
    model, retriever = setup()
    with pytest.raises(UserError, match="no cloze questions"):
        evaluate_cloze(model, TOKENIZER, [], retriever=retriever)
    with pytest.raises(UserError, match="unknown cloze mode"):
        evaluate_cloze(model, TOKENIZER, QUESTIONS, retriever=retriever, modes=["memroy"])
    with pytest.raises(UserError, match="need a retriever"):
        evaluate_cloze(model, TOKENIZER, QUESTIONS, modes=["memory"])


# -------------------------------------------------------------------------- held-out text


def slow_loss(
    model: Memory3, window: list[int], memories: Memories | None, skip: int = 0
) -> tuple[float, int]:
    idx = torch.tensor([window])
    chunks = math.ceil(len(window) / CONFIG.chunk_length)
    if memories is None:
        memories = Memories.empty(1, chunks, memory_shape=CONFIG.memory_shape)
    prefix = torch.tensor(TOKENIZER.reference_prefix())
    logp = torch.log_softmax(model(idx, memories, prefix=prefix).double(), -1)[0]
    terms = [-float(logp[t - 1, window[t]]) for t in range(1 + skip, len(window))]
    return sum(terms), len(terms)


TEXTS = [
    " ".join(FACTS[i : i + 4]) + " " + " ".join(_word() for _ in range(30)) for i in range(0, 12, 4)
]


def test_heldout_loss_equals_the_slow_reference() -> None:
    model, retriever = setup()
    fast = evaluate_heldout(
        model, TOKENIZER, TEXTS, retriever=retriever, seq_length=150, batch_size=2
    )
    windows = []
    for text in TEXTS:
        ids = TOKENIZER.encode(text)
        windows += [[TOKENIZER.bos_id, *ids[s : s + 150]] for s in range(0, len(ids), 150)]
    total = count = 0
    for w in windows:
        loss, n = slow_loss(model, w, None)
        total, count = total + loss, count + n
    none = fast["paper"]["none"]
    assert none.loss == pytest.approx(total / count, rel=1e-5)
    assert none.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert none.tokens == count
    # paper protocol: chunk c reads what its own text retrieved
    total = 0.0
    for w in windows:
        chunks = [w[max(s, 1) : s + 64] for s in range(0, len(w), 64)]
        memories = retriever.retrieve([chunks]).memories
        total += slow_loss(model, w, memories)[0]
    assert fast["paper"]["memory"].loss == pytest.approx(total / count, rel=1e-5)
    # causal protocol: chunk c reads what chunk c - 1 retrieved, chunk 0 nothing
    total = 0.0
    for w in windows:
        chunks = [w[max(s, 1) : s + 64] for s in range(0, len(w), 64)]
        memories = retriever.retrieve([[None, *chunks[:-1]]]).memories
        total += slow_loss(model, w, memories)[0]
    assert fast["causal"]["memory"].loss == pytest.approx(total / count, rel=1e-5)
    assert fast["causal"]["memory"].loss != pytest.approx(fast["paper"]["memory"].loss)


def test_rag_scores_only_the_text_after_the_references() -> None:
    model, retriever = setup()
    fast = evaluate_heldout(
        model,
        TOKENIZER,
        TEXTS[:1],
        retriever=retriever,
        modes=["rag"],
        protocols=["paper"],
        seq_length=150,
    )
    window = [TOKENIZER.bos_id, *TOKENIZER.encode(TEXTS[0])[:150]]
    before = rag_prefixes(retriever, TOKENIZER, [TOKENIZER.decode(window[1:])])[0]
    assert before and TOKENIZER.decode(before).count("Reference:") == 3
    loss, n = slow_loss(model, [window[0], *before, *window[1:]], None, skip=len(before))
    first = evaluate_heldout(
        model,
        TOKENIZER,
        TEXTS[:1],
        retriever=retriever,
        modes=["rag"],
        protocols=["paper"],
        seq_length=150,
        max_sequences=1,
    )
    assert first["paper"]["rag"].loss == pytest.approx(loss / n, rel=1e-5)
    assert first["paper"]["rag"].tokens == n
    assert fast["paper"]["rag"].tokens >= n


def test_heldout_bad_input() -> None:
    model, retriever = setup()
    with pytest.raises(UserError, match="empty"):
        evaluate_heldout(model, TOKENIZER, ["", ""], retriever=retriever)
    with pytest.raises(UserError, match="protocols"):
        evaluate_heldout(model, TOKENIZER, TEXTS, retriever=retriever, protocols=["future"])


# ---------------------------------------------------------------------------- interval


@given(st.integers(1, 2000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_solves_its_quadratic(case: tuple[int, int]) -> None:
    correct, total = case
    low, high = wilson_interval(correct, total)
    p, z = correct / total, 1.96
    # the interval's ends are the p solving (p_hat - p)^2 = z^2 p (1 - p) / n
    a = 1 + z * z / total
    b = -(2 * p + z * z / total)
    c = p * p
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    assert low == pytest.approx(max(0.0, (-b - root) / (2 * a)), abs=1e-9)
    assert high == pytest.approx(min(1.0, (-b + root) / (2 * a)), abs=1e-9)
    assert low <= p <= high
