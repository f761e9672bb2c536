"""Generation: loading with checks, cached decoding with memory swaps, sampling, RAG, the CLI."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3.bank.build import build_memory
from m3.cli import main
from m3.core.errors import UserError
from m3.core.memories import Memories
from m3.data.tokenizer import ByteTokenizer
from m3.inference.generate import (
    allowed_logits,
    generate,
    load_inference,
    rag_context,
    sample_next,
    stop_at,
)
from m3.model.memory3 import Memory3
from m3.recipes import load_recipe
from m3.retrieval.embedders import HashedNgramEmbedder

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes/tiny/base.yaml")
BANK = str(ROOT / "recipes/tiny/build-memory.yaml")
# 16-token chunks: a few dozen generated tokens cross several chunk boundaries
SMALL = [
    "model.n_layer=2", "model.reference_length=32", "model.chunk_length=16",
    "model.block_size=256", "trainer.enable_progress_bar=false",
    "data.knowledge=[{class_path: world, init_args: {split: kb, n_people: 12, n_places: 6, "
    "n_orgs: 6}}]",
]  # fmt: skip
PROMPTS = [
    "Ada Lovelace was born in",  # ends mid-chunk
    "The river flows north. The river flows nort",  # 44 bytes + <s> = 45 tokens
    "Trailidran was founded in 1128. Its bridge",  # 43 bytes + <s> = 44
    "x" * 31,  # 31 bytes + <s> = 32 tokens: ends on a chunk boundary
]


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~150-reference bank of the synthetic world, written by random tiny weights."""
    root = tmp_path_factory.mktemp("generate")
    recipe = load_recipe(
        [BASE, BANK], [*SMALL, f"output={root / 'bank'}", f"training.init_weights={root}/m.pt"]
    )
    torch.manual_seed(0)
    torch.save(Memory3(recipe.model.config()).state_dict(), root / "m.pt")
    return build_memory(recipe, batch_size=64)


@pytest.fixture(scope="module")
def inference(bank: Path):
    with load_inference(bank) as loaded:
        yield loaded


def reference_memories(inference, per_chunk: list[torch.Tensor]) -> Memories:
    """The pool a full forward reads: chunk c sees the memories of `per_chunk[c]` (k ids)."""
    store, k = inference.bank.store, inference.retriever.k
    flat = torch.stack(per_chunk).reshape(-1)
    present = sorted(set(flat[flat >= 0].tolist()))
    slot = {i: n for n, i in enumerate(present)}
    pool = store.read(torch.tensor(present, dtype=torch.long))
    index = torch.tensor([slot.get(i, -1) for i in flat.tolist()])[None]
    owner = torch.arange(len(per_chunk)).repeat_interleave(k)
    visible = (owner[None, :] == torch.arange(len(per_chunk))[:, None])[None]
    return Memories.from_references(pool, index, visible)


def slow_generate(inference, prompt: str, steps: int, *, memory: bool = True) -> list[int]:
    """Greedy decoding by a full forward pass per token, retrieving as paper §3.1–§3.2 says.

    Prompt chunks read what their own text retrieved; decoded chunk c reads what chunk
    c − 1's complete text retrieved.
    """
    model, tokenizer, retriever = inference.model, inference.tokenizer, inference.retriever
    chunk, shape = model.config.chunk_length, model.config.memory_shape
    context = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    found = retriever.retrieve_context([context])
    per_chunk = [found.ids[0, c] for c in range(found.ids.shape[1])]
    out: list[int] = []
    while len(out) < steps:
        chunks = -(-len(context) // chunk)
        while len(per_chunk) < chunks:
            per_chunk.append(retriever.retrieve_next([context[: len(per_chunk) * chunk]]).ids[0, 0])
        if memory:
            memories = reference_memories(inference, per_chunk)
        else:
            memories = Memories.empty(1, chunks, memory_shape=shape)
        logits = model(torch.tensor([context]), memories, prefix=inference.prefix)[:, -1]
        token = int(allowed_logits(logits, tokenizer).argmax(-1))
        if token == tokenizer.eos_id:
            break
        out.append(token)
        context.append(token)
    return out


# ----------------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_cached_generation_with_swaps_equals_a_full_forward_per_token(inference, mode) -> None:
    steps = 40  # the 45-token prompt reaches 85 tokens: chunks 2, 3, 4 and 5 are decoded
    out = generate(inference, PROMPTS, max_new_tokens=steps, mode=mode)
    for b, prompt in enumerate(PROMPTS):
        want = slow_generate(inference, prompt, steps, memory=mode == "memory")
        assert out.tokens[b] == want, f"row {b}"
        assert out.finish_reasons[b] == ("length" if len(want) == steps else "eos")
    assert out.texts == [inference.tokenizer.decode(t) for t in out.tokens]
    if mode == "memory":  # not vacuous: memories change the text, and swaps change memories
        plain = generate(inference, PROMPTS, max_new_tokens=steps, mode="none")
        assert plain.tokens != out.tokens
        assert any(
            entry.retrieved_with == "previous chunk" and entry.ids != before.ids
            for row in out.provenance
            for before, entry in itertools.pairwise(row)
        )


def test_warmup_mode_generates_as_a_plain_causal_lm(inference) -> None:
    """mode="warmup": no reference prefix, no memories, the cache equals a full forward."""
    model, tokenizer = inference.model, inference.tokenizer
    steps = 20
    out = generate(inference, PROMPTS, max_new_tokens=steps, mode="warmup")
    for b, prompt in enumerate(PROMPTS):
        context, want = [tokenizer.bos_id, *tokenizer.encode(prompt)], []
        while len(want) < steps:
            logits = model(torch.tensor([context]))[:, -1]  # warmup mode: no prefix
            token = int(allowed_logits(logits, tokenizer).argmax(-1))
            if token == tokenizer.eos_id:
                break
            want.append(token)
            context.append(token)
        assert out.tokens[b] == want, f"row {b}"
    assert out.mode == "warmup" and all(row == [] for row in out.provenance)
    assert out.tokens != generate(inference, PROMPTS, max_new_tokens=steps, mode="none").tokens


def test_provenance_lists_every_chunk_with_the_references_it_read(inference) -> None:
    out = generate(inference, PROMPTS, max_new_tokens=40)
    retriever, chunk = inference.retriever, inference.model.config.chunk_length
    found = retriever.retrieve_context(out.contexts)
    for b, rows in enumerate(out.provenance):
        read = len(out.contexts[b]) + len(out.tokens[b]) - 1
        assert [r.chunk for r in rows] == list(range(-(-read // chunk)))
        assert rows[0].start == 0 and rows[-1].end == read
        assert all(r.end == s.start for r, s in itertools.pairwise(rows))
        prompt_chunks = -(-len(out.contexts[b]) // chunk)
        for entry in rows[:prompt_chunks]:
            assert entry.retrieved_with == "prompt"
            ids = found.ids[b, entry.chunk]
            assert entry.ids == ids[ids >= 0].tolist()
        for entry in rows:
            references = inference.bank.store.references(entry.ids)
            assert entry.texts == [inference.tokenizer.decode(r.ids) for r in references]
    # the 32-token prompt ends on a boundary: its first decoded chunk inherits
    inherited = out.provenance[3][2]
    assert inherited.retrieved_with == "inherited"
    assert inherited.ids == out.provenance[3][1].ids


# byte tokens: "a", "b", "€" (e2 82 ac) whole or cut short, a stray continuation byte, and
# one never valid in UTF-8
_PIECES = [b"a", b"b", b"\xe2\x82\xac", b"\xe2\x82", b"\x80", b"\xff"]


@given(data=st.data())
@settings(max_examples=400, deadline=None)
def test_a_growing_text_is_cut_for_good_only_where_its_whole_text_is_cut(data) -> None:
    """Stopping at the first prefix whose cut holds gives the cut of decoding every token."""
    tokenizer = ByteTokenizer()
    ids = list(b"".join(data.draw(st.lists(st.sampled_from(_PIECES), max_size=12))))
    full = tokenizer.decode(ids)
    pieces = st.tuples(st.integers(0, len(full)), st.integers(1, 3))  # parts of the text
    stops = [full[i : i + n] for i, n in data.draw(st.lists(pieces, max_size=3))]
    stops += data.draw(st.lists(st.text(alphabet="ab€\ufffd", max_size=3), max_size=2))
    want = stop_at(full, stops, final=True)
    assert want == min((full.find(s) for s in stops if s and s in full), default=None)
    for t in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:t])
        cut = stop_at(text, stops)
        if cut is not None:
            assert want is not None and text[:cut] == full[:want], (t, text)
            break


def test_rows_stop_once_their_text_holds_a_stop_string(inference) -> None:
    steps = 40  # memory swaps at 16-token boundaries happen before and after the stops
    full = generate(inference, PROMPTS, max_new_tokens=steps)
    assert all(len(t) >= 12 for t in full.texts)
    stops = [text[8:10] for text in full.texts]  # every row holds one early
    out = generate(inference, PROMPTS, max_new_tokens=steps, stop=stops)
    decode = inference.tokenizer.decode
    for b, tokens in enumerate(out.tokens):
        assert out.finish_reasons[b] == "stop" and len(tokens) < steps
        assert tokens == full.tokens[b][: len(tokens)]
        assert stop_at(decode(tokens[:-1]), stops) is None  # the first token that could stop
        cut = stop_at(out.texts[b], stops, final=True)
        assert out.texts[b][:cut] == full.texts[b][: stop_at(full.texts[b], stops, final=True)]
        assert out.provenance[b][-1].end == len(out.contexts[b]) + len(tokens) - 1


def test_rows_stop_at_the_models_context(inference) -> None:
    prompt = "y" * 250  # 251 tokens of a 256-token context
    out = generate(inference, [prompt, "short"], max_new_tokens=20)
    assert len(out.tokens[0]) <= 5 and len(out.tokens[1]) <= 20
    assert out.finish_reasons[0] in ("length", "eos")


# ----------------------------------------------------------------------- sampling


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**31),
    temperature=st.floats(0.3, 2.0),
    top_k=st.none() | st.integers(2, 50),
    top_p=st.none() | st.floats(0.2, 1.0),
)
def test_sampling_is_reproducible_per_seed(inference, seed, temperature, top_k, top_p) -> None:
    options = dict(max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p)
    first = generate(inference, PROMPTS[:2], seed=seed, **options)
    again = generate(inference, PROMPTS[:2], seed=seed, **options)
    assert first.tokens == again.tokens


def test_different_seeds_give_different_samples(inference) -> None:
    samples = {
        tuple(
            generate(inference, PROMPTS[:1], temperature=1.5, seed=s, max_new_tokens=24).tokens[0]
        )
        for s in range(4)
    }
    assert len(samples) > 1


def test_top_k_of_one_is_greedy(inference) -> None:
    greedy = generate(inference, PROMPTS, max_new_tokens=30)
    for seed in (0, 1):
        sampled = generate(
            inference, PROMPTS, max_new_tokens=30, temperature=0.8, top_k=1, seed=seed
        )
        assert sampled.tokens == greedy.tokens


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    top_k=st.integers(1, 12),
    top_p=st.floats(0.05, 1.0),
)
def test_samples_stay_within_top_k_and_the_nucleus(seed, top_k, top_p) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 12, generator=generator) * 3
    token = sample_next(logits, temperature=1.0, top_k=top_k, generator=generator)
    rank = (logits > logits.gather(1, token[:, None])).sum(-1)
    assert bool((rank < top_k).all())
    token = sample_next(logits, temperature=1.0, top_p=top_p, generator=generator)
    probs = torch.softmax(logits, -1)
    mass_before = (probs * (probs > probs.gather(1, token[:, None]))).sum(-1)
    assert bool((mass_before < top_p + 1e-6).all())


def test_bad_sampling_settings_name_the_key(inference) -> None:
    for options, key in (
        (dict(temperature=-1.0), "generation.temperature"),
        (dict(top_k=0), "generation.top_k"),
        (dict(top_p=1.5), "generation.top_p"),
        (dict(max_new_tokens=0), "generation.max_new_tokens"),
        (dict(mode="text"), "generation.mode"),
    ):
        with pytest.raises(UserError, match=key):
            generate(inference, PROMPTS[:1], **options)


# ----------------------------------------------------------------------- RAG


def test_rag_context_puts_each_reference_before_the_prompt() -> None:
    text = rag_context("Question?", ["first fact.", "second fact."])
    assert text == "Reference: first fact.\nReference: second fact.\nQuestion?"
    assert rag_context("Q", []) == "Q"


def test_rag_prompts_hold_the_retrieved_texts_and_read_no_memories(inference) -> None:
    out = generate(inference, PROMPTS[:2], max_new_tokens=10, mode="rag")
    tokenizer = inference.tokenizer
    ids, _ = inference.retriever.search(PROMPTS[:2])
    for b, prompt in enumerate(PROMPTS[:2]):
        (entry,) = out.provenance[b]
        assert entry.chunk == -1 and entry.retrieved_with == "rag"
        assert entry.ids == ids[b][ids[b] >= 0].tolist() and len(entry.ids) == 5
        context = tokenizer.decode(out.contexts[b])
        assert context == rag_context(prompt, entry.texts)
        assert all(text in context for text in entry.texts)
    # the RAG prompt read without memories, as mode "none" reads it
    for b in range(2):
        plain = generate(
            inference, [tokenizer.decode(out.contexts[b])], max_new_tokens=10, mode="none"
        )
        assert plain.tokens[0] == out.tokens[b]


# ----------------------------------------------------------------------- bad input


def test_an_empty_or_too_long_prompt_is_refused(inference) -> None:
    with pytest.raises(UserError, match="prompt 2 is empty"):
        generate(inference, ["fine", "  "])
    with pytest.raises(UserError, match=r"model.block_size = 256"):
        generate(inference, ["z" * 300])
    with pytest.raises(UserError, match="RAG prompt"):
        generate(inference, ["z" * 200], mode="rag")


def test_k_larger_than_the_knowledge_base_is_refused(bank) -> None:
    with pytest.raises(UserError, match=r"retrieval.k: k=1000 .* holds only 150"):
        load_inference(bank, k=1000)


def test_weights_other_than_the_banks_writer_are_refused(bank, tmp_path) -> None:
    torch.manual_seed(1)
    recipe = load_recipe(bank / "recipe.yaml")
    torch.save(Memory3(recipe.model.config()).state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"training.init_weights: .*rebuild the memory bank"):
        load_inference(bank, weights=tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"model: .*model.n_layer is 3, the bank's 2"):
        load_inference(bank, overrides=["model.n_layer=3"])


def test_an_index_of_another_embedder_is_refused(bank, tmp_path) -> None:
    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    other = HashedNgramEmbedder(dim=4096, ngrams=[1])
    other.fit(["some other knowledge base entirely"])
    shutil.rmtree(copy / "embedder")
    other.save(copy / "embedder")
    with pytest.raises(UserError, match=r"retrieval.bank: .*embedder"):
        load_inference(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["embedder"]["fingerprint"] = other.fingerprint()  # the saved one, the index's not
    (copy / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_inference(copy)  # the manifest now vouches for it: nothing to detect
    loaded.close()


def test_a_missing_bank_or_weights_names_the_key(tmp_path) -> None:
    with pytest.raises(UserError, match=r"retrieval\.bank: name"):
        load_inference(load_recipe(BASE))
    with pytest.raises(UserError, match=r"retrieval.bank: .* does not exist"):
        load_inference(load_recipe(BASE, [f"retrieval.bank={tmp_path}/none"]))


# ----------------------------------------------------------------------- the command


def test_the_command_prints_texts_and_references(bank, capsys) -> None:
    code = main(
        ["generate", str(bank), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
         "--max-new-tokens", "20", "--show-references"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("=== ") == 2 and "memory, 20 new tokens" in out
    assert out.count("references:") == 2
    assert "chunk 0, tokens 0-15 (retrieved with prompt):" in out
    assert "(retrieved with previous chunk):" in out
    greedy = generate_texts(bank, PROMPTS[:2], 20)
    assert PROMPTS[0] + greedy[0] in out


def generate_texts(bank: Path, prompts: list[str], steps: int) -> list[str]:
    with load_inference(bank) as loaded:
        return generate(loaded, prompts, max_new_tokens=steps).texts


def test_the_command_takes_a_recipe_with_overrides(bank, capsys) -> None:
    code = main(
        ["generate", str(bank / "recipe.yaml"), f"retrieval.bank={bank}", "generation.mode=rag",
         "--prompt", PROMPTS[0], "--max-new-tokens", "5", "--show-references"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "rag, 5 new tokens" in out and "rag prompt, tokens 0-" in out


def test_warmup_mode_from_the_command_and_the_recipe(bank, capsys) -> None:
    with load_inference(bank) as loaded:
        want = generate(loaded, PROMPTS[:1], max_new_tokens=6, mode="warmup").texts[0]
    for extra in (["--mode", "warmup"], ["generation.mode=warmup"]):
        assert (
            main(["generate", str(bank), *extra, "--prompt", PROMPTS[0], "--max-new-tokens", "6"])
            == 0
        )
        out = capsys.readouterr().out
        assert out.startswith("=== 1: warmup, ") and PROMPTS[0] + want in out


def test_an_unknown_mode_names_the_key_and_the_modes(bank, capsys) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal, its usage first
        main(["generate", str(bank), "--mode", "text", "--prompt", "a"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --mode: invalid choice: 'text'" in err
    assert "'memory', 'none', 'rag', 'warmup'" in err and "Traceback" not in err
    assert main(["generate", str(bank), "generation.mode=text", "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "generation.mode: expected one of 'memory', 'none', 'rag', 'warmup', got 'text'" in err
    assert "Traceback" not in err


def test_the_command_reports_bad_input_in_one_line(bank, capsys) -> None:
    for extra, message in (
        (["--prompt", ""], "prompt 1 is empty"),
        (["--prompt", "a" * 300], "model.block_size = 256"),
        (["retrieval.k=999", "--prompt", "a"], "retrieval.k: k=999"),
    ):
        assert main(["generate", str(bank), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("m3: error: ") and message in err
        assert "Traceback" not in err and err.count("\n") == 1


def test_retrieval_min_score_from_the_recipe_drops_weak_candidates(bank) -> None:
    # nothing of it is in the (English) world's knowledge base: it scores only by hash
    # collisions of its 8 tokens (about 0.1 here)
    query = "漢字のテキスト 🙂"
    with load_inference(bank) as loaded:
        ids, _ = loaded.retriever.search([query])
        assert (ids >= 0).all()  # the default: the k best, whatever they score
    with load_inference(bank, overrides=["retrieval.min_score=0.3"], threshold=None) as loaded:
        assert loaded.retriever.min_score == 0.3
        ids, _ = loaded.retriever.search([query])
        assert (ids == -1).all()
        known = loaded.bank.store.references([0])[0]
        ids, _ = loaded.retriever.search([loaded.tokenizer.decode(known.ids)])
        assert ids[0, 0] == 0  # its own text (no leakage filter here) scores far above it
