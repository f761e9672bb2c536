"""m3 as an lm-evaluation-harness model: lm-eval's numbers equal m3's own, offline.

The core check is the issue's: a local lm-eval task over cloze questions (local JSON, no hub)
scored through `lm_eval.simple_evaluate` gives `acc` equal to `evaluate_cloze`'s accuracy on
the same questions and weights, per mode, and per question. Rolling log-likelihoods equal
`evaluate_heldout`'s losses; a long context retrieves per chunk as the paper's evaluation
does; an exported checkpoint under lm-eval's own `hf` model equals `mode=warmup`.
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import lm_eval.tasks
import pytest
import torch
from lm_eval.tasks import TaskManager
from test_evaluate import QUESTIONS, TEXTS, TOKENIZER, setup

from m3.cli import main
from m3.core.errors import UserError
from m3.core.memories import Memories
from m3.data.world import ClozeQuestion
from m3.inference.evaluate import evaluate_cloze, evaluate_heldout
from m3.inference.generate import generate, generate_from_ids, stop_at
from m3.inference.generation_score import answer_words, evaluate_generation
from m3.inference.harness import M3LM
from m3.inference.harness_runs import (
    cloze_task,
    generation_task,
    lm_eval_recipe,
    markdown_table,
)
from m3.inference.loading import Inference, load_inference
from m3.recipes import RECIPES_DIR, load_recipe
from m3.retrieval.retriever import Retriever

MODES = ("memory", "none", "rag", "warmup")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # lm-eval's datasets come from the hub, which these tests must never need
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def local_only() -> TaskManager:
    """A task manager without lm-eval's own index of tasks (tens of seconds to build)."""
    return TaskManager(include_defaults=False)


def write_questions(path: Path, questions: list[ClozeQuestion]) -> Path:
    path.write_text("".join(json.dumps(q._asdict()) + "\n" for q in questions))
    return path


def small_inference() -> Inference:
    """test_evaluate's model (random weights that tell options apart), with a leakage filter."""
    model, plain = setup()
    retriever = Retriever(
        embedder=plain.embedder, index=plain.index, store=plain.store, tokenizer=TOKENIZER,
        model=model, k=3, threshold=2 / 3,
        expected_embedder_fingerprint=plain.embedder.fingerprint(),
    )  # fmt: skip
    prefix = torch.tensor(TOKENIZER.reference_prefix())
    return Inference(model, TOKENIZER, retriever, None, prefix, None, None)  # type: ignore[arg-type]


def m3_cloze(inference: Inference, questions, mode: str) -> float:
    """`m3 evaluate`'s cloze accuracy; warmup is its `none` mode read as a warmup model."""
    if mode == "warmup":
        return evaluate_cloze(
            inference.model, TOKENIZER, questions, modes=["none"], without_memory="warmup"
        )["none"].accuracy
    return evaluate_cloze(
        inference.model, TOKENIZER, questions, retriever=inference.retriever, modes=[mode]
    )[mode].accuracy


# ----------------------------------------------------------------------- agreement


def test_lm_eval_acc_equals_m3_evaluate_per_mode_and_per_question(tmp_path: Path) -> None:
    inference = small_inference()
    task = cloze_task(write_questions(tmp_path / "cloze.jsonl", QUESTIONS))
    logliks = {}
    for mode in MODES:
        model = M3LM.from_inference(inference, mode=mode, batch_size=7)
        out = lm_eval.simple_evaluate(
            model=model, tasks=[task], task_manager=local_only(), bootstrap_iters=0
        )
        acc = out["results"]["m3_cloze"]["acc,none"]
        assert acc == pytest.approx(m3_cloze(inference, QUESTIONS, mode)), mode
        samples = sorted(out["samples"]["m3_cloze"], key=lambda s: s["doc_id"])
        assert len(samples) == len(QUESTIONS)
        for sample, question in zip(samples, QUESTIONS, strict=True):
            assert sample["acc"] == m3_cloze(inference, [question], mode), (mode, question)
            # the request is the prompt and an option, tokens as m3 evaluate reads them
            assert sample["arguments"][0] == (question.prompt, question.options[0])
        logliks[mode] = [r[0][0] for s in samples for r in [s["resps"][0]]]
    # each mode reads the model differently (memories read, prefix or not, references)
    for a, b in [("memory", "none"), ("none", "warmup"), ("none", "rag")]:
        assert logliks[a] != pytest.approx(logliks[b], abs=1e-4), (a, b)


def test_through_model_args_on_a_bank_folder(tiny_bank, tmp_path: Path) -> None:
    """`model="m3"` with lm-eval's argument string, on a bank m3 build-memory wrote."""
    import m3.inference.harness  # noqa: F401  (registers "m3")

    questions = tiny_bank.world.cloze_questions(12) + tiny_bank.world.cloze_questions(
        12, split="train"
    )
    task = cloze_task(write_questions(tmp_path / "cloze.jsonl", questions))
    with load_inference(tiny_bank.folder, k=5, threshold=0.667) as inference:
        expected = {m: m3_cloze(inference, questions, m) for m in ("memory", "warmup")}
    for mode, accuracy in expected.items():
        out = lm_eval.simple_evaluate(
            model="m3",
            model_args=f"bank={tiny_bank.folder},mode={mode},k=5,threshold=0.667,batch_size=64",
            tasks=[task],
            task_manager=local_only(),
            bootstrap_iters=0,
            log_samples=False,
        )
        assert out["results"]["m3_cloze"]["acc,none"] == pytest.approx(accuracy), mode


# ------------------------------------------------------------------ the request types


def slow_context_loglik(inference: Inference, context: str, continuation: str) -> float:
    """One row: chunk c reads what its own context text retrieved (one call per chunk);
    chunks past the context read the last context chunk's memories."""
    model, retriever = inference.model, inference.retriever
    chunk, k = model.config.chunk_length, retriever.k
    ctx = [TOKENIZER.bos_id, *TOKENIZER.encode(context)]
    row = ctx + TOKENIZER.encode(continuation)
    per_chunk = []
    for start in range(0, len(row), chunk):
        text = ctx[max(start, 1) : start + chunk]
        if start < len(ctx) and text:
            per_chunk.append(retriever.retrieve([[text]], leak_texts=[ctx[1:]]).ids[0, 0])
        else:
            per_chunk.append(per_chunk[-1] if per_chunk else torch.full((k,), -1))
    flat = torch.stack(per_chunk).reshape(-1)
    present = sorted(set(flat[flat >= 0].tolist()))
    if present:
        slot = {i: n for n, i in enumerate(present)}
        index = torch.tensor([slot.get(i, -1) for i in flat.tolist()])[None]
        owner = torch.arange(len(per_chunk)).repeat_interleave(k)
        visible = (owner[None, :] == torch.arange(len(per_chunk))[:, None])[None]
        pool = retriever.store.read(torch.tensor(present, dtype=torch.long))
        memories = Memories.from_references(pool, index, visible)
    else:
        memories = Memories.empty(1, len(per_chunk), memory_shape=model.config.memory_shape)
    logp = torch.log_softmax(model(torch.tensor([row]), memories, prefix=inference.prefix), -1)
    return sum(float(logp[0, t - 1, row[t]]) for t in range(len(ctx), len(row)))


def test_a_long_context_retrieves_chunk_by_chunk_without_its_continuation() -> None:
    inference = small_inference()
    lm = M3LM.from_inference(inference, mode="memory", batch_size=3)
    context = " ".join(q.prompt + q.options[0] + "." for q in QUESTIONS[:6])  # ~3 chunks
    pairs = [(context, " " + "x" * 70), (context[:90], QUESTIONS[7].options[1]), ("", " Ab")]
    fast = lm.score_pairs(pairs)
    for (ctx, cont), (loglik, _) in zip(pairs, fast, strict=True):
        assert loglik == pytest.approx(slow_context_loglik(inference, ctx, cont), abs=1e-4)


@pytest.mark.parametrize("protocol", ["paper", "causal"])
def test_rolling_loglikelihood_equals_heldout_loss(protocol: str) -> None:
    inference = small_inference()
    heldout = evaluate_heldout(
        inference.model, TOKENIZER, TEXTS, retriever=inference.retriever, protocols=[protocol],
        seq_length=150, batch_size=2, max_sequences=None,
    )[protocol]  # fmt: skip
    for mode in ("memory", "none", "rag"):
        lm = M3LM.from_inference(
            inference, mode=mode, protocol=protocol, seq_length=150, batch_size=2
        )
        total = sum(lm.score_texts(TEXTS))
        score = heldout[mode]
        assert -total / score.tokens == pytest.approx(score.loss, rel=1e-5), mode


def test_generate_until_is_greedy_generation_cut_at_until() -> None:
    inference = small_inference()
    prompts = [q.prompt for q in QUESTIONS[:3]]
    for mode in MODES:
        lm = M3LM.from_inference(inference, mode=mode, batch_size=2)
        full = generate(inference, prompts, max_new_tokens=12, mode=mode).texts  # type: ignore[arg-type]
        longest = max(full, key=len)
        stop = longest[len(longest) // 2]
        out = lm.continue_texts([(p, {"until": [stop], "max_gen_toks": 12}) for p in prompts])
        assert out == [t[: t.index(stop)] if stop in t else t for t in full], mode
        assert lm.continue_texts([(prompts[1], {"until": "\u2603", "max_gen_toks": 12})]) == [
            full[1]
        ]


def test_generate_until_stops_early_with_the_text_of_decoding_every_token() -> None:
    inference = small_inference()
    prompts = [q.prompt for q in QUESTIONS[:6]]
    steps = 40
    for mode in MODES:
        lm = M3LM.from_inference(inference, mode=mode, batch_size=2)
        full = generate(inference, prompts, max_new_tokens=steps, mode=mode).texts  # type: ignore[arg-type]
        until = [text[5:7] for text in full]  # every row holds one of them early
        out = lm.continue_texts([(p, {"until": until, "max_gen_toks": steps}) for p in prompts])
        assert out == [t[: stop_at(t, until, final=True)] for t in full], mode
        # the batches stopped decoding early: every row at the first token that could stop
        rows = lm._generation_contexts(prompts)
        found = generate_from_ids(
            inference, rows, max_new_tokens=steps, mode="none" if mode == "rag" else mode,  # type: ignore[arg-type]
            stop=until,
        )  # fmt: skip
        reasons = ["stop" if len(t) >= 7 else "eos" for t in full]  # short: EOS came first
        assert found.finish_reasons == reasons and "stop" in reasons, mode
        assert max(len(t) for t in found.tokens) < steps // 2, mode


@pytest.fixture(scope="module")
def bank_inference(tiny_bank):
    """The tiny bank with its writer's weights, k=5 and the evaluation's threshold."""
    with load_inference(tiny_bank.folder, k=5, threshold=0.667) as inference:
        yield inference


def answered(inference: Inference, questions: list[ClozeQuestion], steps: int):
    """The questions, every third one's answer the first word that memory mode writes after
    its prompt and every third after it a later word (random weights state no fact)."""
    rows = [[TOKENIZER.bos_id, *TOKENIZER.encode(q.prompt)] for q in questions]
    texts = generate_from_ids(inference, rows, max_new_tokens=steps).texts
    out = []
    for n, (question, text) in enumerate(zip(questions, texts, strict=True)):
        words = answer_words(text)
        if n % 3 == 2 or len(words) < 2:
            out.append(question)
            continue
        options = list(question.options)
        options[question.answer] = " " + (words[0] if n % 3 == 0 else words[-1])
        out.append(question._replace(options=tuple(options)))
    return out


def test_lm_evals_generation_task_scores_as_the_generation_metric_per_mode(
    tiny_bank, bank_inference, tmp_path: Path
) -> None:
    steps = 16
    asked = tiny_bank.world.cloze_questions(12) + tiny_bank.world.cloze_questions(6, split="train")
    questions = answered(bank_inference, asked, steps)
    task = generation_task(
        write_questions(tmp_path / "cloze.jsonl", questions), max_new_tokens=steps
    )
    ours = evaluate_generation(bank_inference, questions, max_new_tokens=steps, batch_size=8)
    ours["warmup"] = evaluate_generation(
        bank_inference, questions, modes=["none"], max_new_tokens=steps, batch_size=8,
        without_memory="warmup",
    )["none"]  # fmt: skip
    figures = {}
    for mode, score in ours.items():
        model = M3LM.from_inference(bank_inference, mode=mode, batch_size=8)
        out = lm_eval.simple_evaluate(
            model=model, tasks=[task], task_manager=local_only(), bootstrap_iters=0
        )
        found = out["results"]["m3_generation"]
        assert found["exact,none"] == pytest.approx(score.exact), mode
        assert found["contains,none"] == pytest.approx(score.contains), mode
        samples = sorted(out["samples"]["m3_generation"], key=lambda s: s["doc_id"])
        assert len(samples) == len(questions)
        for sample, seen in zip(samples, score.samples, strict=False):  # the first ones
            assert sample["arguments"][0] == (seen["prompt"], task["generation_kwargs"])
            assert sample["filtered_resps"][0] == seen["continuation"], mode
            assert (sample["exact"], sample["contains"]) == (seen["exact"], seen["contains"])
        figures[mode] = (score.exact, score.contains)
    # not vacuous: hits and misses of both matches, figures that differ between modes
    assert 0 < figures["memory"][0] < figures["memory"][1] < 1
    assert len(set(figures.values())) > 1, figures


def test_generate_in_warmup_mode_is_lm_evals_warmup_model(tiny_bank, capsys) -> None:
    from lm_eval.api.instance import Instance

    prompt = tiny_bank.world.cloze_questions(1)[0].prompt
    code = main([
        "generate", str(tiny_bank.folder), "--mode", "warmup", "--prompt", prompt,
        "--max-new-tokens", "12",
    ])  # fmt: skip
    assert code == 0
    header, printed = capsys.readouterr().out.split("\n", 1)
    request = Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)
    lm = M3LM(bank=str(tiny_bank.folder), mode="warmup")
    text = lm.generate_until([request])[0]
    assert header.startswith("=== 1: warmup, ") and printed == prompt + text + "\n"
    assert text != M3LM.from_inference(lm.inference, mode="none").generate_until([request])[0]


# ------------------------------------------------------------------ export and hf


def test_an_exported_checkpoint_under_lm_evals_hf_model_equals_warmup_mode(
    tmp_path: Path,
) -> None:
    from test_export import make_run

    run = make_run(tmp_path, "model.memory_layers=[1]")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    questions = [
        ClozeQuestion("The cat sat on the", (" mat", " log", " dog"), 0, "e", "a", ()),
        ClozeQuestion("Alice met Bob in", (" Paris", " Rome", " the"), 1, "e", "a", ()),
        ClozeQuestion("Memories are written once and", (" read", " sat"), 0, "e", "a", ()),
        ClozeQuestion("Bob met Carol", (" in Rome", " on the mat"), 0, "e", "a", ()),
    ]
    task = cloze_task(write_questions(tmp_path / "cloze.jsonl", questions))
    results = {}
    for name, model, args in [
        ("m3", "m3", f"weights={run},mode=warmup"),
        # the exported tokenizer adds no <s>: m3 puts it in front itself, so lm-eval must too
        ("hf", "hf", f"pretrained={out},add_bos_token=True,dtype=float32,device=cpu"),
    ]:
        found = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=[task], task_manager=local_only(),
            bootstrap_iters=0,
        )  # fmt: skip
        samples = sorted(found["samples"]["m3_cloze"], key=lambda s: s["doc_id"])
        results[name] = (
            found["results"]["m3_cloze"]["acc,none"],
            [r[0][0] for s in samples for r in s["resps"]],
        )
    assert results["m3"][0] == results["hf"][0]
    assert results["m3"][1] == pytest.approx(results["hf"][1], abs=1e-4)


# ------------------------------------------------------------------ command and stage


@pytest.fixture
def quick_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's command line without its index of built-in tasks (local tasks only)."""

    class LocalOnly(TaskManager):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)


def refused(capsys, *args: str) -> str:
    assert main(["lm-eval", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("m3: error:") == 1, err
    return err


def test_the_command_runs_lm_evals_cli_with_m3_registered(
    tiny_bank, tmp_path: Path, quick_cli, capsys
) -> None:
    from m3.inference.harness_runs import write_cloze_task, write_generation_task

    questions = tiny_bank.world.cloze_questions(8)
    cloze = write_questions(tmp_path / "cloze.jsonl", questions)
    yaml = write_cloze_task(cloze, tmp_path)
    generation = write_generation_task(cloze, tmp_path / "gen", max_new_tokens=8)
    bank = tiny_bank.folder
    code = main([
        "lm-eval", "--model", "m3", "--model_args", f"bank={bank},mode=memory,k=5",
        "--tasks", f"{yaml},{generation}", "--batch_size", "8",
        "--output_path", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == 0
    assert "m3_cloze" in capsys.readouterr().out
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())["results"]
    with load_inference(bank, k=5) as inference:
        assert results["m3_cloze"]["acc,none"] == pytest.approx(
            m3_cloze(inference, questions, "memory")
        )
        # the YAML's !function metrics, from the module written next to it
        score = evaluate_generation(inference, questions, modes=["memory"], max_new_tokens=8)
        assert results["m3_generation"]["exact,none"] == score["memory"].exact
        assert results["m3_generation"]["contains,none"] == score["memory"].contains

    args = ["--tasks", str(yaml), "--model", "m3"]
    err = refused(capsys, *args, "--model_args", f"bank={bank},mode=memroy")
    assert "model_args mode='memroy'" in err and "memory, none, rag, warmup" in err
    torch.save({k: v + 1 for k, v in torch.load(tiny_bank.weights).items()}, tmp_path / "o.pt")
    err = refused(capsys, *args, "--model_args", f"bank={bank},weights={tmp_path / 'o.pt'}")
    assert "model_args weights (training.init_weights)" in err

    hub = tmp_path / "hub.yaml"  # a task whose dataset lives on the hub
    hub.write_text(
        "task: hub_arc\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Challenge\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: question\n"
        "doc_to_choice: '{{choices.text}}'\ndoc_to_target: 0\n"
    )
    ok_model = ["--model", "m3", "--model_args", f"bank={bank}"]
    err = refused(capsys, *ok_model, "--tasks", str(hub))
    assert "--tasks: lm-eval could not load a task" in err and "local task files" in err
    assert "--tasks: Tasks not found: no_such_task" in refused(
        capsys, *ok_model, "--tasks", "no_such_task"
    )


def stage_recipe(tiny_bank, tmp_path: Path, *overrides: str, questions=None):
    questions = questions or tiny_bank.world.cloze_questions(10)
    cloze = write_questions(tmp_path / "cloze.jsonl", questions)
    return load_recipe(
        [RECIPES_DIR / "tiny" / "base.yaml"],
        [
            "model.n_layer=2", "model.reference_length=32", "model.block_size=512",
            "stage=lm_eval", f"output={tmp_path / 'lm_eval'}",
            f"retrieval={{bank: {tiny_bank.folder}}}", f"evaluation={{cloze: {cloze}}}",
            f"training.init_weights={tiny_bank.weights}",
            "lm_eval={tasks: [m3_cloze], modes: [memory, warmup], limit: 6, bootstrap_iters: 0}",
            *overrides,
        ],
    ), cloze  # fmt: skip


def test_the_stage_writes_results_and_a_table_the_report_includes(
    tiny_bank, bank_inference, tmp_path: Path
) -> None:
    from m3.data.world import read_cloze
    from m3.report import write_report

    questions = answered(bank_inference, tiny_bank.world.cloze_questions(10), 8)
    recipe, cloze = stage_recipe(
        tiny_bank, tmp_path, "lm_eval.tasks=[m3_cloze, m3_generation]",
        "evaluation.generation={max_new_tokens: 8}", questions=questions,
    )  # fmt: skip
    folder = lm_eval_recipe(recipe)
    scores = json.loads((folder / "lm_eval.json").read_text())["scores"]
    with load_inference(recipe) as inference:
        asked = read_cloze(cloze)[:6]
        generation = evaluate_generation(inference, asked, modes=["memory"], max_new_tokens=8)
        warm = evaluate_generation(
            inference, asked, modes=["none"], max_new_tokens=8, without_memory="warmup"
        )
        for mode in ("memory", "warmup"):
            expected = m3_cloze(inference, asked, mode)
            assert scores[mode]["m3_cloze"]["acc,none"] == pytest.approx(expected)
            score = generation["memory"] if mode == "memory" else warm["none"]
            assert scores[mode]["m3_generation"]["exact,none"] == score.exact
            assert scores[mode]["m3_generation"]["contains,none"] == score.contains
    assert scores["memory"]["m3_generation"]["contains,none"] > 0  # the answered questions
    table = (folder / "lm_eval.md").read_text()
    assert table == markdown_table(scores)
    assert "| task | metric | memory | warmup |" in table and "| m3_cloze | acc |" in table
    assert "| m3_generation | exact |" in table
    for name in ("m3_cloze.yaml", "m3_generation.yaml", "m3_generation_metrics.py", "done.json"):
        assert (folder / name).is_file(), name
    report = write_report(recipe, [("lm_eval", recipe)], {"lm_eval": {"seconds": 1.0}})
    assert table in report.read_text()


def test_the_stage_names_the_key_of_a_task_it_cannot_load(
    tiny_bank, tmp_path: Path, quick_cli
) -> None:
    recipe, _ = stage_recipe(tiny_bank, tmp_path, "lm_eval.tasks=[no_such_task]")
    with pytest.raises(UserError, match=r"lm_eval\.tasks: .*no_such_task"):
        lm_eval_recipe(recipe)
    assert not (tmp_path / "lm_eval").exists()  # refused before the folder is claimed
    recipe, _ = stage_recipe(tiny_bank, tmp_path, "evaluation=null")
    with pytest.raises(UserError, match=r"lm_eval\.tasks: the m3_cloze task reads evaluation"):
        lm_eval_recipe(recipe)


def test_bad_model_arguments_name_the_argument(tiny_bank) -> None:
    with pytest.raises(UserError, match="model_args bank: name the memory bank"):
        M3LM()
    with pytest.raises(UserError, match="model_args protocol='both'"):
        M3LM(bank=str(tiny_bank.folder), protocol="both")
    with pytest.raises(UserError, match="model_args k=0"):
        M3LM(bank=str(tiny_bank.folder), k=0)
    with pytest.raises(UserError, match="model_args: m3 takes no argument bnak"):
        M3LM(bnak=str(tiny_bank.folder))
    with pytest.raises(UserError, match=r"model_args bank \(retrieval\.bank\)"):
        M3LM(bank="nowhere")
    with pytest.raises(UserError, match="model_args batch_size=0"):
        M3LM.from_inference(small_inference(), batch_size=0)
    with pytest.raises(UserError, match=r"a generate_until context of 5001 tokens \(with <s>\)"):
        M3LM.from_inference(small_inference()).continue_texts([("x" * 5000, {})])
    assert M3LM(bank=str(tiny_bank.folder), mode=None).mode == "none"  # lm-eval's `none`
