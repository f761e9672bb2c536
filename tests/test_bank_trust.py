"""Trust in a bank: kills leave no dead end, resumes notice changed inputs, `m3 verify`.

Each case first reproduces what a user found (a store that a killed writer left, a resume
after the knowledge base changed, "nothing to do" on a bank with a file gone) through the
real command, then checks what m3 does now.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_bank import Interrupt

from m3.backends import HDF5Store
from m3.backends.hdf5_salvage import marker_path
from m3.bank.build import build_memory
from m3.bank.open import open_bank
from m3.cli import main
from m3.core.errors import UserError
from m3.model.memory3 import Memory3
from m3.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes/tiny/base.yaml")
BANK = str(ROOT / "recipes/tiny/build-memory.yaml")
SMALL = ["model.n_layer=2", "model.reference_length=32", "trainer.enable_progress_bar=false"]
WORDS = [
    "river",
    "bridge",
    "copper",
    "town",
    "lake",
    "harbour",
    "crane",
    "marsh",
    "stone",
    "winter",
    "north",
    "hill",
    "engine",
    "program",
    "wire",
    "salt",
    "observatory",
    "pillar",
    "founded",
    "studied",
    "closed",
    "flows",
    "makes",
    "employs",
]


def write_kb(path: Path, documents: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")


def make_weights(path: Path, seed: int = 0) -> None:
    recipe = load_recipe([BASE, BANK], SMALL)
    torch.manual_seed(seed)
    torch.save(Memory3(recipe.model.config()).state_dict(), path)


def args(kb: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [
        BASE, BANK, *SMALL, f"output={out}", f"training.init_weights={weights}",
        f"data.knowledge=[{{class_path: files, init_args: {{paths: [{kb}]}}}}]", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    write_kb(root / "kb.jsonl", 40)
    make_weights(root / "model.pt")
    return {"root": root, "kb": root / "kb.jsonl", "weights": root / "model.pt"}


@pytest.fixture(scope="module")
def reference_bank(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "bank"
    assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out)]) == 0
    return out


def contents(folder: Path) -> dict:
    """What a bank serves: ids, memories, provenance, search results, manifest counts."""
    bank = open_bank(folder)
    ids = bank.store.ids()
    memory = bank.store.read(ids)
    queries = bank.embedder.embed([" ".join(WORDS[i : i + 4]) for i in range(0, 20, 2)])
    hits = bank.index.search(queries, 5).ids
    manifest = {k: bank.manifest[k] for k in ("references", "world_size", "shards")}
    out = {
        "ids": ids.tolist(),
        "keys": memory.keys.float().clone(),
        "values": memory.values.float().clone(),
        "valid": memory.valid.clone(),
        "positions": memory.positions.clone(),
        "references": bank.store.references(ids),
        "hits": hits.tolist(),
        "manifest": manifest,
    }
    bank.store.close()
    return out


def assert_same_bank(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"]
    assert got["references"] == want["references"]
    assert got["manifest"] == want["manifest"]
    assert got["hits"] == want["hits"]
    # a resumed build batches references differently: equal up to float rounding
    torch.testing.assert_close(got["keys"], want["keys"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["values"], want["values"], atol=1e-6, rtol=0)
    assert torch.equal(got["valid"], want["valid"])
    assert torch.equal(got["positions"], want["positions"])


def copy_bank(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bank"
    shutil.copytree(source, out)
    return out


def adopt(folder: Path, inputs: dict[str, Path]) -> None:
    """Make a copied bank the run folder of the recipe that writes to its new place."""
    from m3.core.runs import RunFolder

    items = args(inputs["kb"], inputs["weights"], folder)
    recipe = load_recipe(items[:2], items[2:])
    run = RunFolder(folder, recipe.to_dict(), recipe.to_yaml())
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    (folder / "fingerprint").write_text(run.fingerprint + "\n")
    if (folder / "done.json").is_file():
        done = json.loads((folder / "done.json").read_text())
        (folder / "done.json").write_text(json.dumps({**done, "fingerprint": run.fingerprint}))


# ------------------------------------------------------------------ a writer that died
def die_while_writing(path: Path, info_json: str, count: int) -> None:
    """In a child process: write `count` references to a new store, then die unclosed."""
    code = f"""
import os, torch
from m3.backends import HDF5Store, StoreInfo
from m3.core.memories import SparseMemory
info = StoreInfo.from_json({info_json!r})
store = HDF5Store({str(path)!r}, info=info, mode="w")
L, _, H, k, d = info.memory_shape
torch.manual_seed(0)
n = {count}
memory = SparseMemory(torch.randn(n, L, H, k, d), torch.randn(n, L, H, k, d),
                      torch.ones(n, k, dtype=torch.bool), torch.arange(k).expand(n, L, H, k))
store.write(torch.arange(n), memory, [("doc", i, i + 1, (i, i + 1)) for i in range(n)])
store._h5().flush()
os._exit(0)  # no close: as SIGKILL leaves it
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.fixture
def store_info():
    from m3.backends import StoreInfo

    return StoreInfo(memory_shape=(2, 2, 2, 4, 8), dtype="float32")


def test_a_store_whose_writer_died_is_refused_to_readers_and_salvaged_by_writers(
    tmp_path, store_info
):
    path = tmp_path / "s.h5"
    die_while_writing(path, store_info.to_json(), 20)
    assert marker_path(path).is_file()
    with pytest.raises(UserError, match=r"s\.h5\.writing"):
        HDF5Store(path, allow_incomplete=False)
    store = HDF5Store(path, mode="a")  # salvages: every reference passes its checks
    assert not path.with_name("s.h5.salvage").exists()
    assert store.ids().tolist() == list(range(20)) and store.verify() == []
    assert store.references([3]) == [("doc", 3, 4, (3, 4))]
    store.mark_complete()
    store.close()
    assert not marker_path(path).exists()
    assert HDF5Store(path).complete


def test_salvage_drops_exactly_the_damaged_rows(tmp_path, store_info, capsys):
    path = tmp_path / "s.h5"
    die_while_writing(path, store_info.to_json(), 12)
    store = HDF5Store(path, mode="r", allow_incomplete=True)
    offset, row_bytes = store.row_location(5)
    store.close()
    with path.open("r+b") as f:  # a torn row: the kill hit it halfway
        f.seek(offset + row_bytes // 3)
        f.write(b"\xff" * 16)
    store = HDF5Store(path, mode="a")
    assert "kept the 11 references" in capsys.readouterr().err
    assert store.ids().tolist() == [i for i in range(12) if i != 5]
    assert store.verify() == []
    store.close()


def test_a_store_whose_header_was_torn_starts_again_when_its_info_is_known(tmp_path, store_info):
    path = tmp_path / "s.h5"
    die_while_writing(path, store_info.to_json(), 8)
    with path.open("r+b") as f:
        f.write(b"\0" * 512)  # the superblock is gone
    with pytest.raises(Exception, match="header is unreadable"):
        HDF5Store(path, mode="a")
    store = HDF5Store(path, mode="a", info=store_info)
    assert len(store) == 0
    store.close()


# ------------------------------------------------------------------ resumes and "complete"
def test_a_resume_refuses_a_knowledge_base_whose_texts_changed(inputs, tmp_path, capsys):
    kb = tmp_path / "kb.jsonl"
    shutil.copy(inputs["kb"], kb)
    out = tmp_path / "bank"
    recipe = load_recipe(args(kb, inputs["weights"], out)[:2], args(kb, inputs["weights"], out)[2:])
    with pytest.raises(RuntimeError, match="simulated"):
        build_memory(recipe, batch_size=4, callbacks=[Interrupt(2)])
    # same ids, same lengths, other text
    lines = [json.loads(line) for line in kb.read_text().splitlines()]
    for line in lines:
        line["text"] = line["text"].replace("river", "rover")
    kb.write_text("".join(json.dumps(line) + "\n" for line in lines))
    capsys.readouterr()
    assert main(["build-memory", *args(kb, inputs["weights"], out)]) == 2
    assert "another knowledge base" in capsys.readouterr().err
    assert not (out / "done.json").exists()
    assert main(["build-memory", *args(kb, inputs["weights"], out), "--overwrite"]) == 0
    bank = open_bank(out)
    texts = [bytes(r.ids).decode() for r in bank.store.references(bank.store.ids())]
    assert any("rover" in t for t in texts) and not any("river" in t for t in texts)


def test_replaced_weights_are_named_and_overwrite_really_starts_again(
    inputs, reference_bank, tmp_path, capsys
):
    weights = tmp_path / "model.pt"
    shutil.copy(inputs["weights"], weights)
    out = tmp_path / "bank"
    assert main(["build-memory", *args(inputs["kb"], weights, out)]) == 0
    make_weights(weights, seed=1)  # replaced in place, same path
    capsys.readouterr()
    assert main(["build-memory", *args(inputs["kb"], weights, out)]) == 2
    err = capsys.readouterr().err
    assert "the weights (training.init_weights) changed" in err and "--overwrite" in err
    assert main(["build-memory", *args(inputs["kb"], weights, out), "--overwrite"]) == 0
    model = Memory3(load_recipe([BASE, BANK], SMALL).model.config())
    model.load_state_dict(torch.load(weights))
    assert open_bank(out).manifest["model_fingerprint"] == model.memory_fingerprint()


@pytest.mark.parametrize(
    "damage", ["manifest", "shard", "truncated shard", "index", "done marker left alone"]
)
def test_a_bank_with_a_file_gone_is_rebuilt_not_called_complete(
    inputs, reference_bank, tmp_path, capsys, damage
):
    out = copy_bank(reference_bank, tmp_path)
    shard = out / "store-rank0.h5"
    if damage == "manifest":
        (out / "manifest.json").unlink()
    elif damage == "shard":
        shard.unlink()
    elif damage == "truncated shard":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "index":
        shutil.rmtree(out / "index")
    capsys.readouterr()
    adopt(out, inputs)
    assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out)]) == 0
    said = capsys.readouterr()
    if damage == "done marker left alone":
        assert "nothing to do" in said.out
    else:
        assert "resuming" in said.err and "nothing to do" not in said.out
    assert_same_bank(contents(out), contents(reference_bank))


# ------------------------------------------------------------------ m3 verify
def test_verify_passes_a_sound_bank_and_names_damaged_references(
    inputs, reference_bank, tmp_path, capsys
):
    assert main(["verify", str(reference_bank)]) == 0
    assert "all checks hold" in capsys.readouterr().out
    out = copy_bank(reference_bank, tmp_path)
    adopt(out, inputs)
    store = HDF5Store(out / "store-rank0.h5")
    offsets = {i: store.row_location(i)[0] for i in (3, 17)}
    store.close()
    with (out / "store-rank0.h5").open("r+b") as f:
        for offset in offsets.values():
            f.seek(offset + 40)
            f.write(b"\x5a\xa5")
    assert main(["verify", str(out)]) == 1
    said = capsys.readouterr().out
    assert "2 damaged" in said and "damaged reference ids: 3, 17" in said
    cwd = os.getcwd()
    assert main(["verify", str(out), "--repair"]) == 0
    assert os.getcwd() == cwd
    assert "all checks hold" in capsys.readouterr().out
    assert json.loads((out / "done.json").read_text())["encoded_this_run"] == 2  # exactly those
    assert_same_bank(contents(out), contents(reference_bank))


def test_repair_salvages_a_shard_whose_writer_died_and_encodes_only_what_it_lost(
    inputs, reference_bank, tmp_path, capsys
):
    out = copy_bank(reference_bank, tmp_path)
    adopt(out, inputs)
    shard = out / "store-rank0.h5"
    store = HDF5Store(shard)
    offset = store.row_location(9)[0]
    store.close()
    with shard.open("r+b") as f:  # the row a killed writer was writing
        f.seek(offset + 8)
        f.write(b"\0" * 24)
    marker_path(shard).write_text(json.dumps({"pid": 0, "host": socket.gethostname()}))
    assert main(["verify", str(out)]) == 1
    assert "store-rank0.h5 was being written when its writer stopped" in capsys.readouterr().out
    assert main(["verify", str(out), "--repair"]) == 0
    assert json.loads((out / "done.json").read_text())["encoded_this_run"] == 1
    assert not marker_path(shard).exists()
    assert_same_bank(contents(out), contents(reference_bank))


def test_verify_names_an_index_that_disagrees_with_the_store(
    inputs, reference_bank, tmp_path, capsys
):
    out = copy_bank(reference_bank, tmp_path)
    bank = open_bank(out)
    bank.index.remove(torch.tensor([4]))
    bank.index.save(out / "index")
    assert main(["verify", str(out)]) == 1
    assert "1 references not indexed" in capsys.readouterr().out


def test_verify_names_a_damaged_or_foreign_reference_table(
    inputs, reference_bank, tmp_path, capsys
):
    out = copy_bank(reference_bank, tmp_path)
    table = json.loads((out / "references" / "manifest.json").read_text())
    (out / "references" / "manifest.json").write_text(json.dumps({**table, "knowledge": "0" * 64}))
    assert main(["verify", str(out)]) == 1
    assert "references/ holds the references of another knowledge base" in capsys.readouterr().out
    (out / "references" / "shard-00000" / "tokens.npy").write_bytes(b"x")
    assert main(["verify", str(out)]) == 1
    assert "a shard of the reference table is damaged" in capsys.readouterr().out


def test_verify_names_a_missing_bank(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no such bank folder" in capsys.readouterr().err


# ------------------------------------------------------------------ kill -9, again and again
def _writer(shard: Path) -> int | None:
    """The pid in a shard's writing marker (a killed writer's stays until the next opens)."""
    try:
        return json.loads(marker_path(shard).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _count(shard: Path) -> int:
    """References a killed build's shard holds (0 when it cannot be read at all)."""
    try:
        with HDF5Store(shard, mode="r", allow_incomplete=True) as store:
            return len(store)
    except Exception:
        return 0


# ------------------------------------------------------------------ edited banks
@pytest.fixture(scope="module")
def edited_bank(inputs, reference_bank, tmp_path_factory) -> Path:
    """The reference bank after two edits: one document rewritten longer and one deleted,
    then another deleted (two layers)."""
    out = copy_bank(reference_bank, tmp_path_factory.mktemp("edited"))
    adopt(out, inputs)
    replacement = out.parent / "new.jsonl"
    text = " ".join(WORDS[:12] * 3)  # longer than d5: new ids, the old ones removed
    replacement.write_text(json.dumps({"id": "d5", "text": text}) + "\n")
    assert main(["edit", str(out), "--replace", str(replacement), "--delete", "d7"]) == 0
    assert main(["edit", str(out), "--delete", "d9"]) == 0
    return out


def test_a_resumed_build_of_an_edited_bank_keeps_its_edits(edited_bank, inputs, tmp_path, capsys):
    from m3.bank.inputs import read_manifest
    from m3.bank.layout import index_path

    want = contents(edited_bank)
    assert main(["verify", str(edited_bank)]) == 0
    out = copy_bank(edited_bank, tmp_path)
    adopt(out, inputs)
    shutil.rmtree(out / index_path(read_manifest(out)))  # the index after both edits, gone
    capsys.readouterr()
    assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out)]) == 0
    assert "resuming" in capsys.readouterr().err
    assert_same_bank(contents(out), want)
    assert main(["verify", str(out)]) == 0
    assert read_manifest(out)["edits"] == read_manifest(edited_bank)["edits"]


def test_a_damaged_edit_layer_is_named_by_verify_and_by_repair(
    edited_bank, inputs, tmp_path, capsys
):
    from m3.bank.inputs import read_manifest

    out = copy_bank(edited_bank, tmp_path)
    adopt(out, inputs)
    edit = read_manifest(out)["edits"][0]
    damaged = edit["written"][1]
    with HDF5Store(out / edit["layer"]) as layer:
        offset = layer.row_location(damaged)[0]
    with (out / edit["layer"]).open("r+b") as f:
        f.seek(offset + 40)
        f.write(b"\x5a\xa5")
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert f"damaged reference ids: {damaged}" in capsys.readouterr().out
    assert main(["verify", str(out), "--repair"]) == 2
    err = capsys.readouterr().err
    assert f"references [{damaged}] of edit 1 are damaged" in err and "['d5']" in err
    assert "Traceback" not in err


def test_an_edited_bank_whose_manifest_is_lost_is_refused_not_rebuilt_without_its_edits(
    edited_bank, reference_bank, inputs, tmp_path, capsys
):
    out = copy_bank(edited_bank, tmp_path)
    adopt(out, inputs)
    (out / "manifest.json").unlink()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "edit.lock"}
    capsys.readouterr()
    assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out)]) == 2
    err = capsys.readouterr().err
    assert "edits" in err and "cannot be replayed" in err and "Traceback" not in err
    now = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "edit.lock"}
    assert now == files  # nothing was written
    assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out), "--overwrite"]) == 0
    assert_same_bank(contents(out), contents(reference_bank))  # the bank as built, no edits


@pytest.mark.slow
def test_a_build_killed_twenty_times_resumes_to_the_uninterrupted_bank(inputs, tmp_path):
    kb = tmp_path / "kb.jsonl"
    write_kb(kb, 1200, seed=3)
    reference = tmp_path / "reference"
    assert main(["build-memory", *args(kb, inputs["weights"], reference), "--batch-size", "8"]) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "m3", "build-memory",
               *args(kb, inputs["weights"], out), "--batch-size", "8"]  # fmt: skip
    shard, rng, kills, stored = out / "store-rank0.h5", random.Random(0), 0, []
    total = json.loads((reference / "done.json").read_text())["references"]
    while kills < 20:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)  # fmt: skip
        # wait for the writer to start (its marker), then kill at a random moment after it:
        # the first writes, mid-batch, the index build or its save
        while process.poll() is None and _writer(shard) != process.pid:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 1.5))
        if process.poll() is not None:
            assert process.returncode == 0, process.stderr.read().decode()
            shutil.rmtree(out / "index", ignore_errors=True)  # finished: damage it, go on
            continue
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        stored.append(_count(shard))
    # the kills landed all over the build: before the first row, mid-encoding, after it
    print("references stored at each kill:", stored)
    assert len({n for n in stored if 0 < n < total}) >= 4
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert main(["verify", str(out)]) == 0
    assert_same_bank(contents(out), contents(reference))
    assert not list(out.glob("*.writing")) and not list(out.glob("*.salvage"))
