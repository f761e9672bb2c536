"""What m3 wrote before its modules moved into subpackages still opens, generates and counts.

The files in `tests/fixtures/pre_house/` were written by the code of commit 97a0075 (before the
move), by `tests/fixtures/pre_house/make_fixtures.py` (its docstring has the command line):
a memory bank with the random weights that wrote it, the greedy generations those gave, the
recipe fingerprints of every shipped recipe and pipeline stage, and the markers of a finished
run folder. Every expected value here is read from those files; none is computed by the code
under test.

- a bank built before opens, passes its checks against its weights, and generates exactly
  the recorded tokens in every mode, reading the recorded references;
- every shipped recipe (and pipeline stage) has the fingerprint it had, so that a run folder
  finished before is recognised as complete instead of being run again;
- the finished run folder and the bank folder written before are `complete` for their
  recipes, and claiming them neither refuses nor rewrites them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from m3.bank.open import open_bank
from m3.core.errors import UserError
from m3.core.registry import input_files_unchecked
from m3.core.runs import RunFolder, recipe_fingerprint
from m3.data.tokenizer import ByteTokenizer
from m3.inference.generate import generate
from m3.inference.loading import load_inference
from m3.model.memory3 import Memory3
from m3.recipes import RECIPES_DIR, load_recipe, stage_recipes

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pre_house"
EXPECTED = json.loads((FIXTURES / "expected_generations.json").read_text(encoding="utf-8"))
RECORDED = json.loads((FIXTURES / "recipe_fingerprints.json").read_text(encoding="utf-8"))
ROOT = RECIPES_DIR.parent
MODES = sorted(EXPECTED["generations"])


@pytest.fixture
def old_bank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the fixture's model.pt, bank/ and data/, as the working directory.

    The bank was built from its folder's parent, so its recipe names `output: bank` and
    `training.init_weights: model.pt`, relative to it (as `m3 build-memory` from there).
    """
    root = tmp_path / "pre_house"
    root.mkdir()
    shutil.copyfile(FIXTURES / "model.pt", root / "model.pt")
    for name in ("bank", "data"):
        shutil.copytree(FIXTURES / name, root / name)
    monkeypatch.chdir(root)
    return root


# ------------------------------------------------------------------------------ the bank
def test_fixture_bank_opens_and_passes_its_checks(old_bank: Path) -> None:
    checks = EXPECTED["checks"]
    recipe = load_recipe(old_bank / "bank" / "recipe.yaml")
    model = Memory3(recipe.model.config())
    model.load_state_dict(torch.load(old_bank / "model.pt", weights_only=True))
    bank = open_bank(old_bank / "bank")  # also checks the saved embedder's fingerprint
    try:
        manifest = bank.manifest
        for key, value in checks["manifest"].items():
            assert manifest[key] == value, key
        # the weights are the ones that wrote the memories; the tokenizer the one of the bank
        assert model.memory_fingerprint() == checks["model_memory_fingerprint"]
        assert manifest["model_fingerprint"] == checks["model_memory_fingerprint"]
        assert bank.store.info.model_fingerprint == checks["store_model_fingerprint"]
        bank.store.info.check_model(
            model.config.memory_shape, model.memory_fingerprint(), where="the fixture bank"
        )
        tokenizer = ByteTokenizer()
        assert tokenizer.fingerprint() == checks["tokenizer_fingerprint"]
        assert tokenizer.fingerprint() == manifest["tokenizer_fingerprint"]
        assert tokenizer.reference_prefix() == checks["reference_prefix"]
        # fingerprints now name the embedder by kind (embedder:hashed_ngram): the one the
        # old code recorded, a digest of its module path, is still recognised as this one's
        assert bank.embedder.matches(checks["embedder_fingerprint"])
        assert manifest["embedder"]["fingerprint"] == checks["manifest_embedder_fingerprint"]
        assert list(bank.store.info.memory_shape) == checks["store_memory_shape"]
        assert len(bank.store) == checks["store_len"]
        assert bank.store.ids().tolist() == checks["store_ids"]
        assert len(bank.index) == checks["index_len"]
        assert bank.store.verify() == EXPECTED["verify"] == []
    finally:
        bank.store.close()


def test_fixture_bank_verify_finds_a_damaged_reference(old_bank: Path) -> None:
    """The verify() above can fail: a flipped byte in the copy's store is reported."""
    import h5py

    store = old_bank / "bank" / "store-rank0.h5"
    with h5py.File(store, "r") as file:
        segment = file["payload"][sorted(file["payload"])[0]]
        row = segment[3].copy()
        slot_id = int(file["refs"]["id"][3])
        offset = segment.id.get_offset()
    row[0] ^= 0xFF  # the first byte of the row's keys
    with open(store, "r+b") as raw:
        raw.seek(offset + 3 * len(row))
        raw.write(row.tobytes())
    bank = open_bank(old_bank / "bank")
    try:
        assert bank.store.verify() == [slot_id]
    finally:
        bank.store.close()


def _chunks(provenance: list[Any]) -> list[dict[str, Any]]:
    return [
        {"chunk": c.chunk, "start": c.start, "end": c.end, "ids": list(c.ids),
         "retrieved_with": c.retrieved_with}
        for c in provenance
    ]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_fixture_bank_generates_the_recorded_tokens(old_bank: Path, mode: str) -> None:
    expected = EXPECTED["generations"][mode]
    prompts = EXPECTED["prompts"]
    assert [row["prompt"] for row in expected] == prompts
    # as `m3 generate bank` from the folder the bank was built in
    with load_inference("bank") as inference:
        assert inference.weights == Path("model.pt")
        out = generate(
            inference, prompts, max_new_tokens=EXPECTED["max_new_tokens"], mode=mode,
            temperature=EXPECTED["temperature"],
        )  # fmt: skip
    for n, row in enumerate(expected):
        assert out.tokens[n] == row["tokens"], f"prompt {n}: {row['prompt']!r}"
        assert out.texts[n] == row["text"]
        assert out.contexts[n] == row["context"]
        assert out.finish_reasons[n] == row["finish_reason"]
        assert _chunks(out.provenance[n]) == [
            {k: v for k, v in chunk.items() if k != "scores"} for chunk in row["provenance"]
        ]
        for got, chunk in zip(out.provenance[n], row["provenance"], strict=True):
            assert got.scores == pytest.approx(chunk["scores"], abs=1e-5)


def test_fixture_bank_retrieves_the_recorded_references(old_bank: Path) -> None:
    recorded = EXPECTED["retrieval"]
    with load_inference("bank") as inference:
        retriever = inference.retriever
        assert (retriever.k, retriever.threshold) == (recorded["k"], recorded["threshold"])
        ids, scores = retriever.search(EXPECTED["prompts"])
        contexts = [
            [inference.tokenizer.bos_id, *inference.tokenizer.encode(p)]
            for p in EXPECTED["prompts"]
        ]
        assert contexts == recorded["retrieve_context"]["contexts"]
        found = retriever.retrieve_context(contexts)
    assert ids.tolist() == recorded["search"]["ids"]
    assert scores.flatten().tolist() == pytest.approx(
        torch.tensor(recorded["search"]["scores"]).flatten().tolist(), abs=1e-5
    )
    assert found.ids.tolist() == recorded["retrieve_context"]["ids"]
    assert found.scores.flatten().tolist() == pytest.approx(
        torch.tensor(recorded["retrieve_context"]["scores"]).flatten().tolist(), abs=1e-5
    )


# ------------------------------------------------------------------------------ fingerprints
def _fingerprints(files: list[str], overrides: list[str]) -> tuple[str, dict[str, str]]:
    """The fingerprint of a recipe and of each of its stages, loaded by the code under test."""
    with input_files_unchecked():  # data and weights of other machines, or of earlier stages
        recipe = load_recipe(files, overrides)
        stages = stage_recipes(recipe) if recipe.stage == "pipeline" else []
    own = recipe_fingerprint(recipe.to_dict())
    return own, {name: recipe_fingerprint(stage.to_dict()) for name, stage in stages}


def _recorded(entry: dict[str, Any]) -> tuple[str, dict[str, str]]:
    stages = {name: s["fingerprint"] for name, s in entry.get("stages", {}).items()}
    return entry["fingerprint"], stages


def test_every_shipped_recipe_was_recorded() -> None:
    """The fixture covers the recipes; the pre-change code loaded each of them."""
    assert RECORDED["recipes"], "no recipe fingerprints recorded"
    assert RECORDED["not_loaded"] == {}
    pipelines = [e for e in RECORDED["recipes"].values() if e["stage"] == "pipeline"]
    assert pipelines and all(e["stages"] for e in pipelines)


@pytest.mark.parametrize("name", sorted(RECORDED["recipes"]))
def test_recipe_fingerprints_are_unchanged(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe files as they were (copies in the fixture) give the recorded fingerprints."""
    entry = RECORDED["recipes"][name]
    for f in entry["files"]:  # the copies are the files the pre-change code read
        assert hashlib.sha256((FIXTURES / f).read_bytes()).hexdigest() == entry["sha256"][f]
    monkeypatch.chdir(FIXTURES)  # the command's paths are relative to the repository's root
    assert _fingerprints(entry["files"], entry["overrides"]) == _recorded(entry)


#: Shipped recipe files whose values changed on purpose since the fixture was recorded
CHANGED_ON_PURPOSE = {
    "recipes/quickstart.yaml": "continual training in two parts, for robust reading",
}


@pytest.mark.parametrize("name", sorted(RECORDED["recipes"]))
def test_shipped_recipe_fingerprints_are_unchanged(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository's own recipe files give the recorded fingerprints, except those whose
    values changed on purpose: those are listed, and they must give other fingerprints."""
    entry = RECORDED["recipes"][name]
    changed = [
        f for f in entry["files"]
        if not (ROOT / f).is_file()
        or yaml.safe_load((ROOT / f).read_text()) != yaml.safe_load((FIXTURES / f).read_text())
    ]  # fmt: skip
    assert set(changed) == set(entry["files"]) & set(CHANGED_ON_PURPOSE)
    monkeypatch.chdir(ROOT)
    fingerprints = _fingerprints(entry["files"], entry["overrides"])
    if changed:
        assert fingerprints[0] != _recorded(entry)[0]
    else:
        assert fingerprints == _recorded(entry)


# ------------------------------------------------------------------------------ run folders
def test_finished_run_folder_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warmup run finished by the pre-change code is complete: not run again, not refused."""
    ((folder_name, run),) = RECORDED["runs"].items()
    shutil.copytree(FIXTURES / folder_name, tmp_path / folder_name)
    markers = {p.name: p.read_bytes() for p in (tmp_path / folder_name).iterdir()}
    monkeypatch.chdir(FIXTURES)
    recipe = load_recipe(run["files"], run["overrides"])
    assert recipe.output == folder_name
    monkeypatch.chdir(tmp_path)  # where the run was: its output is relative
    folder = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    assert folder.complete is True
    folder.claim()  # does not refuse the folder
    assert folder.complete is True
    assert (tmp_path / folder_name / "fingerprint").read_bytes() == markers["fingerprint"]
    assert (tmp_path / folder_name / "done.json").read_bytes() == markers["done.json"]
    # the recipe the folder keeps is the same recipe
    kept = load_recipe(tmp_path / folder_name / "recipe.yaml")
    done = json.loads(markers["done.json"])
    assert recipe_fingerprint(kept.to_dict()) == done["fingerprint"]

    other = load_recipe(
        [FIXTURES / f for f in run["files"]], [*run["overrides"], "trainer.max_steps=101"]
    )
    other_folder = RunFolder(recipe.output, other.to_dict(), other.to_yaml())
    assert other_folder.complete is False  # the check above can fail
    with pytest.raises(UserError, match="another recipe"):
        other_folder.claim()


def test_bank_folder_is_complete_for_its_recipe(old_bank: Path) -> None:
    """`m3 build-memory` with the bank's own recipe finds the bank done."""
    done = json.loads((old_bank / "bank" / "done.json").read_text())
    recipe = load_recipe(old_bank / "bank" / "recipe.yaml")
    assert recipe.output == "bank"
    assert recipe_fingerprint(recipe.to_dict()) == done["fingerprint"]
    folder = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    assert folder.complete is True
    folder.claim()
    assert (old_bank / "bank" / "fingerprint").read_text().strip() == done["fingerprint"]
    # the recipe files it was built from (as they were) give the same recipe
    built = EXPECTED["bank"]
    again = load_recipe([FIXTURES / f for f in built["files"]], built["overrides"])
    assert recipe_fingerprint(again.to_dict()) == done["fingerprint"]


# ------------------------------------------------------------------------------ quantized store
def test_a_quantized_store_of_the_pre_change_code_opens_and_reads_the_same(tmp_path: Path) -> None:
    """Its quantizer's fingerprint was a digest of m3 0.1's class paths; it still matches."""
    import gzip
    import shutil
    import warnings

    from m3.backends.hdf5_store import HDF5Store

    folder = FIXTURES / "quantized"
    path = tmp_path / "quantized.h5"
    with gzip.open(folder / "quantized.h5.gz", "rb") as packed, open(path, "wb") as out:
        shutil.copyfileobj(packed, out)
    expected = torch.load(folder / "quantized_reads.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no old module path imported
        with HDF5Store(path) as store:
            assert store.info.quantizer["fingerprint"] == expected["fingerprint"]
            assert store.quantizer.matches(expected["fingerprint"])
            assert store.quantizer.fingerprint() != expected["fingerprint"]  # named anew
            read = store.read(torch.arange(6))
            assert store.verify() == []
    assert torch.equal(read.keys, expected["keys"])
    assert torch.equal(read.values, expected["values"])
