"""The generation metric: greedy continuations of the cloze prompts, scored against the answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from m3.backends.base import StoreInfo
from m3.backends.in_memory import InMemoryStore
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.references import Reference
from m3.core.runs import recipe_fingerprint
from m3.data.tokenizer import ByteTokenizer
from m3.data.world import ClozeQuestion, read_cloze
from m3.inference.diagnostics import answer_token_share
from m3.inference.evaluate import evaluate_recipe, wilson_interval
from m3.inference.generate import generate, generate_from_ids
from m3.inference.generation_score import (
    answer_words,
    evaluate_generation,
    generation_markdown,
    match_answer,
)
from m3.inference.loading import load_inference
from m3.inference.rag import rag_prefixes
from m3.recipes import RECIPES_DIR, RecipeError, load_recipe
from m3.report import generation_verdict

# ------------------------------------------------------------------------------ scoring


def test_exact_needs_the_answer_first_contains_anywhere() -> None:
    answer = " Grorchomhou Group"
    assert match_answer(" Grorchomhou Group. Bulinell works", answer) == (True, True)
    assert match_answer(" the Grorchomhou Group", answer) == (False, True)
    assert match_answer(" Grorchomhou Gandtho Group", answer) == (False, False)
    assert match_answer(" Gandtho Group", answer) == (False, False)
    assert match_answer("", answer) == (False, False)


@pytest.mark.parametrize(
    ("continuation", "answer", "expected"),
    [
        ("GRORCHOMHOU group", " Grorchomhou Group", (True, True)),  # case
        ("\n  1786,\tand", " 1786", (True, True)),  # whitespace and punctuation before/after
        (" 17860", " 1786", (False, False)),  # a word never matches part of a longer one
        (" 1786s", " 1786", (False, False)),
        ("-hot--springs!", " hot springs", (True, True)),  # punctuation separates words
        (" hot\u00a0springs", " hot springs", (True, True)),  # a no-break space
        (" \uff11\uff17\uff18\uff16", " 1786", (True, True)),  # full-width digits (NFKC)
        (" Ströme", " STRÖME", (True, True)),  # case folding beyond ASCII
        (" in 1786", " 1786", (False, True)),
        (" hot, springs", " hot springs", (True, True)),  # the answer's words, in order
        (" springs hot", " hot springs", (False, False)),
    ],
)
def test_normalisation(continuation: str, answer: str, expected: tuple[bool, bool]) -> None:
    assert match_answer(continuation, answer) == expected


def test_an_answer_without_words_is_refused() -> None:
    with pytest.raises(ValueError, match="no word"):
        match_answer(" 1786", " ,.")


_WORD = st.one_of(
    st.text(st.sampled_from("abcXYZ019"), min_size=1, max_size=8),
    st.text(st.characters(categories=("Ll", "Lu", "Nd")), min_size=1, max_size=8),
)
_GAP = st.text(st.sampled_from(" \t\n.,;:!?-()'\""), min_size=1, max_size=3)


@given(
    answer=st.lists(_WORD, min_size=1, max_size=3),
    before=st.lists(_WORD, max_size=3),
    after=st.lists(_WORD, max_size=3),
    gap=_GAP,
)
def test_matches_follow_the_words_whatever_separates_them(answer, before, after, gap) -> None:
    def join(words: list[str]) -> str:
        return gap.join(words)

    stated = " " + join(answer)
    # the answer followed by anything: exact (and contains)
    assert match_answer(gap + join([*answer, *after]) + gap, stated) == (True, True)
    # after other words: contains, exact only when those words begin with the answer's
    text = gap + join([*before, *answer, *after])
    exact, contains = match_answer(text, stated)
    assert contains
    want = answer_words(stated)  # (NFKC may split a word: "Ŀ" is "L·")
    assert exact == (answer_words(join(before + answer))[: len(want)] == want)
    # case and separators never count (ASCII: not every Unicode case mapping goes back)
    if text.isascii():
        assert answer_words(text.upper()) == answer_words(text.lower().replace(gap, " "))


# ----------------------------------------------------------------- on a tiny bank's world


def _questions(tiny_bank, n: int = 10) -> list[ClozeQuestion]:
    return read_cloze(tiny_bank.data / "cloze.jsonl")[:n]


@pytest.fixture(scope="module")
def inference(tiny_bank):
    with load_inference(tiny_bank.folder) as loaded:
        yield loaded


def test_continuations_are_what_generation_writes_in_each_mode(tiny_bank, inference) -> None:
    # 28 new tokens after ~40-byte prompts cross a 64-token chunk: memories are swapped
    questions = _questions(tiny_bank, 3)
    prompts = [q.prompt for q in questions]
    scores = evaluate_generation(
        inference, questions, max_new_tokens=28, modes=["memory", "rag"], batch_size=3
    )
    out = generate(inference, prompts, mode="memory", max_new_tokens=28)
    assert [s["continuation"] for s in scores["memory"].samples] == out.texts
    assert any(c.retrieved_with == "previous chunk" for row in out.provenance for c in row)
    assert scores["memory"].max_new_tokens == 28 and scores["memory"].questions == 3
    # RAG: the references laid out before the prompt as the cloze score's RAG rows are
    tokenizer = inference.tokenizer
    before = rag_prefixes(inference.retriever, tokenizer, prompts)
    rows = [
        [tokenizer.bos_id, *b, *tokenizer.encode(p)] for b, p in zip(before, prompts, strict=True)
    ]
    rag = generate_from_ids(inference, rows, max_new_tokens=28, mode="none")
    assert [s["continuation"] for s in scores["rag"].samples] == rag.texts


def test_generation_reads_memories(tiny_bank, inference) -> None:
    """An answer only memory gives: what the model writes with memory, and not without."""
    questions = _questions(tiny_bank)
    out = generate(inference, [q.prompt for q in questions], mode="memory", max_new_tokens=8)
    plain = generate(inference, [q.prompt for q in questions], mode="none", max_new_tokens=8)
    # each question's answer becomes the first two words its memories made the model write
    rigged = [
        q._replace(options=(" " + " ".join(answer_words(text)[:2]),), answer=0)
        for q, text in zip(questions, out.texts, strict=True)
        if answer_words(text)
    ]
    assert rigged and out.texts != plain.texts
    scores = evaluate_generation(inference, rigged, max_new_tokens=8, modes=["memory", "none"])
    assert scores["memory"].exact == 1.0
    assert scores["none"].exact < 1.0


def test_counts_come_with_wilson_intervals(tiny_bank, inference) -> None:
    questions = _questions(tiny_bank, 7)
    scores = evaluate_generation(inference, questions, max_new_tokens=3, batch_size=7)
    for score in scores.values():
        n = score.questions
        exact, contains = round(score.exact * n), round(score.contains * n)
        assert score.exact_interval == wilson_interval(exact, n)
        assert score.contains_interval == wilson_interval(contains, n)
        assert score.exact <= score.contains
    assert scores["none"].answer_read is None
    assert 0 <= scores["memory"].answer_read <= 1 and 0 <= scores["rag"].answer_read <= 1


def test_bad_arguments_name_the_key(tiny_bank, inference) -> None:
    questions = _questions(tiny_bank, 2)
    with pytest.raises(UserError, match=r"evaluation\.generation\.modes"):
        evaluate_generation(inference, questions, modes=[])
    with pytest.raises(UserError, match=r"evaluation\.generation\.modes"):
        evaluate_generation(inference, questions, modes=["memroy"])
    with pytest.raises(UserError, match=r"evaluation\.generation\.max_new_tokens"):
        evaluate_generation(inference, questions, max_new_tokens=0)
    with pytest.raises(UserError, match=r"evaluation\.generation needs cloze questions"):
        evaluate_generation(inference, [])


# ------------------------------------------------------------------- the answer's tokens


def test_the_share_of_answer_tokens_the_memory_kept() -> None:
    tokenizer = ByteTokenizer()  # one token per byte: the answer's tokens are its bytes
    text = "Ada works for Orbit Group."
    ids = tokenizer.encode(text)
    first, length = text.index(" Orbit"), len(" Orbit Group")
    keep = [  # per memory layer and head, the positions kept (−1: an empty slot)
        [[first, first + 1, first + 2, 0], [0, 1, 2, 3]],
        [[first + 8, first + 9, first + 10, first + 11], [-1, -1, -1, -1]],
    ]
    shape = (2, 2, 2, 4, 8)  # 2 layers, k/v, 2 heads, 4 kept tokens, head dim 8
    zeros = torch.zeros(1, 2, 2, 4, 8)
    memory = SparseMemory(zeros, zeros, torch.ones(1, 4, dtype=torch.bool), torch.tensor([keep]))
    store = InMemoryStore(StoreInfo(memory_shape=shape, dtype="float32", model_fingerprint="m"))
    store.write(torch.tensor([0]), memory, [Reference("doc0", 0, len(ids), tuple(ids))])
    question = ClozeQuestion(
        "Ada works for", (" Other", " Orbit Group"), 1, "person-0", "employer", ("doc0",)
    )
    kept = answer_token_share(store, tokenizer, [question])
    assert kept.questions == 1 and kept.missing == 0
    assert torch.allclose(kept.share, torch.tensor([[3 / length, 0.0], [4 / length, 0.0]]))
    assert torch.allclose(kept.any_head, torch.tensor([3 / length, 4 / length]))
    assert kept.as_plain()["mean"] == pytest.approx(7 / length / 4)
    elsewhere = question._replace(kb_ids=("doc1",))  # a document the bank does not hold
    assert answer_token_share(store, tokenizer, [elsewhere]).missing == 1


def test_the_share_on_a_bank_is_within_bounds(tiny_bank, inference) -> None:
    questions = _questions(tiny_bank, 20)
    kept = answer_token_share(inference.bank.store, inference.tokenizer, questions)
    layers, _, heads, _, _ = inference.bank.store.info.memory_shape
    assert kept.share.shape == (layers, heads) and kept.any_head.shape == (layers,)
    assert kept.questions + kept.missing == len(questions) and kept.questions > 0
    assert ((kept.share >= 0) & (kept.share <= 1)).all()
    assert (kept.any_head >= kept.share.max(1).values - 1e-6).all()


# ---------------------------------------------------------------------- recipe and report


def _recipe(tiny_bank, tmp_path: Path, *more: str):
    from conftest import TINY_WORLD

    sizes = ", ".join(f"{key}: {value}" for key, value in TINY_WORLD.items())
    return load_recipe(
        RECIPES_DIR / "tiny" / "base.yaml",
        [
            "stage=evaluate", "model.n_layer=2", "model.reference_length=32",
            "model.block_size=512", f"output={tmp_path / 'evaluate'}",
            f"training.init_weights={tiny_bank.weights}", f"retrieval.bank={tiny_bank.folder}",
            f"evaluation.cloze={tiny_bank.data / 'cloze.jsonl'}", "evaluation.n_questions=4",
            "evaluation.heldout=[{class_path: world, init_args: {split: heldout, " + sizes + "}}]",
            "evaluation.max_sequences=1", "evaluation.seq_length=32",
            "evaluation.protocols=[paper]", *more,
        ],
    )  # fmt: skip


def test_the_evaluation_reports_generation_next_to_cloze(tiny_bank, tmp_path) -> None:
    recipe = _recipe(
        tiny_bank, tmp_path, "evaluation.generation={n_questions: 3, max_new_tokens: 4}"
    )
    folder = evaluate_recipe(recipe)
    results = json.loads((folder / "evaluation.json").read_text())
    assert set(results["generation"]) == {"memory", "none", "rag"}
    assert results["generation"]["memory"]["questions"] == 3
    kept = results["answer_tokens_kept"]
    assert kept["questions"] + kept["missing"] == 3
    table = (folder / "evaluation.md").read_text()
    assert "Greedy generation after 3 cloze prompts" in table and "Multiple-choice cloze" in table
    assert "Answer tokens kept by the sparsifier" in table
    assert (folder / "generation.png").stat().st_size > 1000
    assert generation_markdown(results) in table
    verdict = generation_verdict(results["generation"])
    assert len(verdict) == 1 and "memory − none" in verdict[0]


def test_without_the_option_nothing_changes(tiny_bank, tmp_path) -> None:
    recipe = _recipe(tiny_bank, tmp_path)
    assert recipe.evaluation.generation is None
    plain = recipe.to_dict()
    older = json.loads(json.dumps(plain))
    del older["evaluation"]["generation"]  # a recipe written before the option existed
    assert recipe_fingerprint(plain) == recipe_fingerprint(older)
    on = _recipe(tiny_bank, tmp_path, "evaluation.generation={}").to_dict()
    assert recipe_fingerprint(on) != recipe_fingerprint(plain)
    folder = evaluate_recipe(recipe)
    assert "generation" not in json.loads((folder / "evaluation.json").read_text())
    assert not (folder / "generation.png").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("evaluation.generation.max_new_tokens=0", "evaluation.generation.max_new_tokens"),
        ("evaluation.generation.n_questions=-1", "evaluation.generation.n_questions"),
        ("evaluation.generation.batch_size=two", "evaluation.generation.batch_size"),
        ("evaluation.generation.modes=[memory, nothing]", "evaluation.generation.modes"),
        ("evaluation.generation.max_tokens=4", "evaluation.generation.max_tokens"),
    ],
)
def test_bad_option_values_name_the_key(tiny_bank, tmp_path, override: str, key: str) -> None:
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        _recipe(tiny_bank, tmp_path, "evaluation.generation={}", override)


def test_no_modes_or_no_questions_are_refused_before_the_folder_is_claimed(
    tiny_bank, tmp_path
) -> None:
    recipe = _recipe(tiny_bank, tmp_path, "evaluation.generation={modes: []}")
    with pytest.raises(UserError, match=r"evaluation\.generation\.modes"):
        evaluate_recipe(recipe)
    recipe = _recipe(tiny_bank, tmp_path, "evaluation.generation={}", "evaluation.cloze=null")
    with pytest.raises(UserError, match=r"evaluation\.generation needs cloze questions"):
        evaluate_recipe(recipe)
    assert not (tmp_path / "evaluate").exists()
