"""The guides' Python scripts (`docs/examples/*.py`, included by the pages) run on real parts.

Each test runs one script at tiny sizes: a bank that `build_memory` wrote (`tiny_bank`), the
tiny model, small worlds. A guide shows the script itself, so what it shows is what runs here.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from m3.inference.generate import Generation

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def references(bank) -> int:
    """References in a bank, as its manifest records."""
    return json.loads((bank.folder / "manifest.json").read_text())["references"]


def run_main(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a script as `python docs/examples/NAME.py ARGS…` would, in this process."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py"), *args])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")


# --------------------------------------------------------------------------------- generation
def test_generate_text_prints_text_and_references(tiny_bank, docs_example, capsys) -> None:
    script = docs_example("generate_text")
    prompts = ["Ada Lovelace was born in", "The drawbridge of"]
    out = script.continue_prompts(str(tiny_bank.folder), prompts, max_new_tokens=80)
    assert isinstance(out, Generation) and out.prompts == prompts
    assert set(out.finish_reasons) <= {"eos", "length"}
    printed = capsys.readouterr().out
    for prompt, text, rows in zip(prompts, out.texts, out.provenance, strict=True):
        assert prompt + text in printed
        assert rows[0].retrieved_with == "prompt"
        assert f"0 0 {rows[0].end} prompt {rows[0].ids}" in printed
        assert all(r.retrieved_with == "previous chunk" for r in rows[1:])
    # a row that ran past token 64 swapped its memories while decoding
    assert any(len(rows) > 1 for rows in out.provenance)
    again = script.continue_prompts(str(tiny_bank.folder), prompts, max_new_tokens=80)
    assert again.texts == out.texts  # seeded


def test_generate_text_command_line(tiny_bank, monkeypatch, capsys) -> None:
    run_main("generate_text", str(tiny_bank.folder), "The town of", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert out.count("The town of") == 1 and "'prefill'" in out


def test_rag_prompt_puts_the_references_before_the_prompt(tiny_bank, docs_example) -> None:
    from m3.inference.loading import load_inference
    from m3.inference.rag import rag_references

    prompt = "Ada Lovelace was born in"
    text = docs_example("rag_prompt").rag_prompt(str(tiny_bank.folder), prompt)
    with load_inference(tiny_bank.folder) as inference:
        found = rag_references(inference.retriever, [prompt])[0]
    assert len(found) == inference.retriever.k
    assert text == "".join(f"Reference: {r.text}\n" for r in found) + prompt


def test_rag_prompt_command_line(tiny_bank, monkeypatch, capsys) -> None:
    run_main("rag_prompt", str(tiny_bank.folder), "The drawbridge of", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert out.rstrip().endswith("The drawbridge of") and out.count("Reference: ") == 5


# --------------------------------------------------------------------------------- evaluation
def test_evaluate_bank_scores_every_mode(tiny_bank, docs_example, capsys) -> None:
    table = docs_example("evaluate_bank").evaluate(str(tiny_bank.folder), str(tiny_bank.data))
    for mode in ("memory", "none", "rag", "shuffled"):
        assert f"| {mode} |" in table
    for protocol in ("paper", "causal"):
        assert f"| {protocol} | memory |" in table
    questions = len(tiny_bank.world.cloze_questions())
    assert f"{questions} questions" in table
    assert len(capsys.readouterr().out.splitlines()) == 2  # accuracy line, loss line


def test_evaluate_bank_command_line(tiny_bank, monkeypatch, capsys) -> None:
    run_main("evaluate_bank", str(tiny_bank.folder), str(tiny_bank.data), monkeypatch=monkeypatch)
    assert "Held-out text" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ editing
def test_edit_bank_replaces_and_deletes(tiny_bank, docs_example, tmp_path, capsys) -> None:
    from m3.bank.open import open_bank

    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank.folder, bank)
    summary = docs_example("edit_bank").edit(str(bank))
    assert (summary.documents_replaced, summary.documents_deleted) == (1, 1)
    assert summary.describe() in capsys.readouterr().out
    opened = open_bank(bank)
    try:
        texts = [r.ids for r in opened.store.references(opened.store.ids())]
        assert len(texts) == summary.references
        tokens = {tuple(ids) for ids in texts}
        assert tuple(b"Velmora Quist worked as a tailor") in tokens  # bytes as tokens
    finally:
        opened.store.close()


def test_measure_edits_leaves_the_bank_and_reports(tiny_bank, docs_example, tmp_path) -> None:
    before = (tiny_bank.folder / "manifest.json").read_bytes()
    report = docs_example("measure_edits").measure(
        str(tiny_bank.folder), str(tmp_path / "edits"), tiny_bank.world.params, n_edits=3
    )
    assert report.n == 3 and 0 <= report.before <= 1 and 0 <= report.took_effect <= 1
    assert report.summary.documents_replaced >= 3 and report.bank.is_relative_to(tmp_path)
    assert (tiny_bank.folder / "manifest.json").read_bytes() == before


# ------------------------------------------------------------------------- the read path
def test_read_path_generates_what_generate_does(tiny_bank, docs_example, capsys) -> None:
    from m3.inference.generate import generate
    from m3.inference.loading import load_inference

    prompt = "Ada Lovelace was born in"  # 25 tokens with <s>: 96 more cross the boundary at 64
    tokens = docs_example("read_path").read_path(str(tiny_bank.folder), prompt, steps=96)
    with load_inference(tiny_bank.folder) as inference:
        out = generate(inference, [prompt], max_new_tokens=96, temperature=0, ignore_eos=True)
    assert tokens == out.tokens[0]
    assert [r.retrieved_with for r in out.provenance[0]] == ["prompt", "previous chunk"]
    assert "CacheStats(hits=" in capsys.readouterr().out


# --------------------------------------------------------------------- the world, the model
def test_world_tour_writes_what_it_prints(docs_example, tmp_path, capsys) -> None:
    sizes = {"n_people": 12, "n_places": 6, "n_orgs": 6}
    world = docs_example("world_tour").tour(str(tmp_path / "world"), sizes, max_chars=5_000)
    assert world.params["n_people"] == 12
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{len(world.knowledge_base())} references, " + (
        f"{len(world.training_documents())} training documents, "
        f"{len(world.cloze_questions())} questions"
    )
    assert lines[-1].endswith("characters") and int(lines[-1].split()[2]) <= 5_000
    assert {p.name for p in (tmp_path / "world").iterdir()} >= {"kb.jsonl", "cloze.jsonl"}


def test_first_forward_reads_memories(docs_example) -> None:
    import torch

    torch.manual_seed(0)
    plain, with_memory = docs_example("first_forward").first_forward()
    assert plain.shape == with_memory.shape == (2, 160, 512)
    # the first chunk's rows differ too: every chunk reads its memories
    assert (plain[:, :64] - with_memory[:, :64]).abs().amax() > 0
    assert torch.isfinite(with_memory).all()


# ------------------------------------------------------------------------- stores and banks
def test_store_round_trip_builds_a_complete_bank(docs_example, tmp_path, capsys) -> None:
    import torch

    from m3.backends import HDF5Store

    script = docs_example("store_round_trip")
    memory = script.round_trip(str(tmp_path))
    assert len(memory) == len(script.TEXTS) and memory.keys.dtype == torch.bfloat16
    assert capsys.readouterr().out.startswith(f"{len(script.TEXTS)} references; doc-0 0 ")
    assert HDF5Store(tmp_path / "bank.h5").complete
    again = script.round_trip(str(tmp_path))  # resumes: nothing left to encode, same bytes
    assert torch.equal(again.keys, memory.keys) and torch.equal(again.valid, memory.valid)


def test_search_bank_reads_the_nearest_references(tiny_bank, docs_example, capsys) -> None:
    memory = docs_example("search_bank").search(str(tiny_bank.folder), "Where was Ada born?")
    config = tiny_bank.recipe.model.config()
    assert tuple(memory.keys.shape) == (5, *config.memory_shape[:1], *config.memory_shape[2:])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[-1].startswith(f"{references(tiny_bank)} references")


def test_cold_start_encodes_once(tiny_bank, docs_example, tmp_path, capsys) -> None:
    cold_start = docs_example("cold_start").cold_start
    store = cold_start(tiny_bank.recipe, str(tmp_path / "lazy.h5"))
    assert store.encoded == 2 and sorted(store.ids().tolist()) == [1, 3]
    store.close()
    store = cold_start(tiny_bank.recipe, str(tmp_path / "lazy.h5"))  # the file keeps them
    assert store.encoded == 0
    store.close()
    assert f"{references(tiny_bank)} references, 2 stored, 2 encoded" in capsys.readouterr().out


def test_quantize_memories_stores_codes(docs_example, tmp_path, capsys) -> None:
    import torch

    from m3.backends import HDF5Store
    from m3.memory.quantize import MemoryQuantizer

    sizes = {"n_people": 24, "n_places": 8, "n_orgs": 8}
    stored = docs_example("quantize_memories").quantize(str(tmp_path), sizes)
    assert stored.keys.dtype == torch.bfloat16 and torch.isfinite(stored.keys.float()).all()
    saved = MemoryQuantizer.load(tmp_path / "bank.quantizer")
    with HDF5Store(tmp_path / "bank.h5") as store:
        assert store.quantizer.fingerprint() == saved.fingerprint()
        assert store.info.vector_bytes == (4, 4)  # 2 coarse + 2 PQ bytes per 16-dim vector
    out = capsys.readouterr().out
    assert f"{len(stored)} references read back, 256 bytes" in out  # 2·2·8 vectors × (4 + 4)


# -------------------------------------------------------------------- a pretrained checkpoint
def test_load_pretrained_runs_a_transformers_checkpoint(docs_example, tmp_path, capsys) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from m3.data.tokenizer import HFTokenizer

    text = "The capital of France is Paris. The capital of Italy is Rome.\n" * 20
    tokenizer = HFTokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )
    )  # fmt: skip
    hf.save_pretrained(tmp_path / "ckpt")
    tokenizer.save(tmp_path / "ckpt")  # tokenizer.json next to config.json

    module = docs_example("load_pretrained").load_pretrained(str(tmp_path / "ckpt"), range(2))
    assert module.hparams.stage == "continual"
    assert module.model.config.memory_layers == (0, 1) and module.model.config.n_layer == 4
    weights = dict(hf.named_parameters())["model.layers.3.mlp.down_proj.weight"]
    assert torch.equal(module.model.layers[3].mlp.down_proj.weight, weights)
    assert "memory_layers=(0, 1)" in capsys.readouterr().out  # the printed config


# ------------------------------------------------------------------ recipes, indexes, specs
def test_recipe_parts_builds_from_overrides(docs_example, capsys) -> None:
    from m3.recipes import RECIPES_DIR

    recipe = docs_example("recipe_parts").recipe_parts(
        [str(RECIPES_DIR / "tiny" / "base.yaml")], ["model.n_layer=6"]
    )
    assert recipe.model.config().n_layer == 6
    layers, *_, tokenizer, max_tokens = capsys.readouterr().out.split()
    assert (layers, tokenizer, max_tokens) == ("6", "ByteTokenizer", "128")


@pytest.mark.parametrize("kind", ["ExactIndex", "ScannIndex"])
def test_index_round_trip_finds_each_query(docs_example, tmp_path, kind, capsys) -> None:
    import m3.backends

    index = docs_example("index_round_trip").index_round_trip(
        str(tmp_path), getattr(m3.backends, kind)
    )
    assert isinstance(index, getattr(m3.backends, kind)) and len(index) == 999
    first, last = capsys.readouterr().out.splitlines()
    assert first.startswith("[0, 10, 20]")  # before the removal: each query's own vector
    assert last.startswith("999 vectors;") and "[0," not in last  # id 0 is gone


def test_leakage_filter_drops_the_copy_only(docs_example, capsys) -> None:
    drop = docs_example("leakage_filter").leakage_filter()
    assert drop.tolist() == [True, False, False]
    overlap, exceeds, _ = capsys.readouterr().out.splitlines()
    assert 0 < float(overlap) <= 2 / 3 and exceeds == "False"


def test_store_from_spec_creates_then_opens(docs_example, tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # where the spec's my_store module lives
    store = docs_example("store_from_spec").store_from_spec(str(tmp_path / "bank"))
    assert type(store).__name__ == "DirectoryStore" and len(store) == 0
    assert (tmp_path / "bank" / "info.json").is_file()
