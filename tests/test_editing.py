"""Knowledge editing: replace and delete documents of tiny banks, through the API and `m3 edit`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from m3.backends import ExactIndex, HDF5Store
from m3.backends.sharded import LayeredStore, ShardedStore
from m3.bank.build import build_memory
from m3.bank.edit import (
    JOURNAL,
    document_references,
    edit_bank,
    resume_edit,
)
from m3.bank.layout import index_path
from m3.bank.open import open_bank
from m3.bank.verify import verify_bank
from m3.cli import main
from m3.core.errors import UserError
from m3.data.chunking import FixedChunker, chunk_documents
from m3.data.tokenizer import ByteTokenizer
from m3.data.world import World
from m3.inference.edits import measure_edits
from m3.memory.encoder import encode_references
from m3.model.memory3 import Memory3
from m3.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes/tiny/base.yaml")
BANK = str(ROOT / "recipes/tiny/build-memory.yaml")
SIZES = {"n_people": 12, "n_places": 6, "n_orgs": 6}
SMALL = [
    "model.n_layer=2", "model.reference_length=32", "trainer.enable_progress_bar=false",
    "data.knowledge=[{class_path: world, init_args: {split: kb, n_people: 12, n_places: 6, "
    "n_orgs: 6}}]",
]  # fmt: skip
#: 46 bytes: two references of at most 32 bytes, like the shortest documents of the world
SAME_COUNT = "Quorra Valdemine sold lanterns in Ashgrove Bay."
LONG = (
    "Orlen Bask repaired clocks on the pier at dawn. His sister Mirel sold the brass gears "
    "to sailors from Tarnwick, who paid in salted fish and amber beads every second winter."
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny random weights, a single-shard bank and a two-shard bank of a small world."""
    root = tmp_path_factory.mktemp("edit")
    recipe = load_recipe([BASE, BANK], SMALL)
    torch.manual_seed(0)
    model = Memory3(recipe.model.config()).eval()
    torch.save(model.state_dict(), root / "model.pt")
    weights = f"training.init_weights={root / 'model.pt'}"
    build_memory(load_recipe([BASE, BANK], [*SMALL, weights, f"output={root / 'one'}"]))
    sharded = load_recipe([BASE, BANK], [*SMALL, weights, f"output={root / 'two'}"])
    build_memory(sharded, shard=(1, 2))
    build_memory(sharded, shard=(0, 2))
    return {"root": root, "model": model, "tokenizer": ByteTokenizer(), "weights": weights}


def copy_of(parts: dict, name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(parts["root"] / name, out)
    return out


def cut(text: str, doc_id: str = "d") -> list:
    return chunk_documents([(doc_id, ByteTokenizer().encode(text))], FixedChunker(32))


def encoded(parts: dict, references: list):
    with torch.no_grad():
        return encode_references(
            parts["model"], [r.ids for r in references], prefix=ByteTokenizer().reference_prefix()
        )


def assert_same(got, want) -> None:
    torch.testing.assert_close(got.keys.float(), want.keys, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.values.float(), want.values, atol=1e-6, rtol=0)
    assert torch.equal(got.valid, want.valid) and torch.equal(got.positions, want.positions)


def top_hit(bank, text: str) -> tuple[int, float]:
    found = bank.index.search(bank.embedder.embed([text]), 1)
    return int(found.ids[0, 0]), float(found.scores[0, 0])


def all_hits(bank, text: str) -> set[int]:
    return set(bank.index.search(bank.embedder.embed([text]), len(bank.index)).ids[0].tolist())


def check_consistent(folder: Path) -> None:
    """Store, index and manifest agree: same ids, same counts."""
    bank = open_bank(folder)
    ids = bank.store.ids()
    assert len(bank.index) == len(bank.store) == bank.manifest["references"] == len(ids)
    texts = [bytes(r.ids).decode() for r in bank.store.references(ids)]
    assert set(all_hits(bank, texts[0])) == set(ids.tolist())
    for entry in bank.manifest["shards"]:  # an edit never rewrites the built shards
        with HDF5Store(folder / entry["file"]) as shard:
            assert len(shard) == entry["references"]
    assert bank.store.verify() == []
    bank.store.close()
    report = verify_bank(folder, progress=False)
    assert report.ok, report.summary()
    listed = {e["layer"] for e in bank.manifest.get("edits", []) if e.get("layer")}
    assert {str(p.relative_to(folder)) for p in folder.glob("edits/*")} == listed
    assert [p.name for p in folder.glob("index*")] == [index_path(bank.manifest)]


def test_replacing_a_document_rewrites_its_memories_and_index_entries(parts, tmp_path):
    folder = copy_of(parts, "one", tmp_path)
    before = open_bank(folder)
    owned = document_references(before.store)
    old_text = "".join(
        bytes(r.ids).decode() for r in before.store.references(owned["place-0001.0"])
    )
    counts = {doc: len(ids) for doc, ids in owned.items()}
    doc = next(d for d, n in counts.items() if n == len(cut(SAME_COUNT)))
    total, next_id = len(before.store), int(before.store.ids().max()) + 1
    before.store.close()

    summary = edit_bank(
        folder, model=parts["model"], tokenizer=parts["tokenizer"],
        replace={doc: SAME_COUNT, "place-0001.0": LONG},
    )  # fmt: skip
    bank = open_bank(folder)
    now = document_references(bank.store)
    # the same number of references: the same ids, rewritten in place
    assert now[doc] == owned[doc]
    new = cut(SAME_COUNT, doc)
    assert_same(bank.store.read(now[doc]), encoded(parts, new))
    assert bank.store.references(now[doc]) == new
    # another number of references: old ids gone, new ones above every id used
    long = cut(LONG, "place-0001.0")
    assert len(long) != len(owned["place-0001.0"])
    assert now["place-0001.0"] == list(range(next_id, next_id + len(long)))
    assert not set(owned["place-0001.0"]) & set(bank.store.ids().tolist())
    assert_same(bank.store.read(now["place-0001.0"]), encoded(parts, long))
    assert bank.store.references(now["place-0001.0"]) == long
    # the index finds the new texts, and no longer holds the old ones
    for reference in new + long:
        hit, score = top_hit(bank, bytes(reference.ids).decode())
        assert score > 0.999 and bytes(bank.store.references([hit])[0].ids) == bytes(reference.ids)
    hit, score = top_hit(bank, old_text[:32])
    assert not (hit in now["place-0001.0"] and score > 0.999)
    assert not all_hits(bank, old_text) & set(owned["place-0001.0"])
    assert summary.documents_replaced == 2 and summary.documents_deleted == 0
    assert summary.references_written == len(new) + len(long)
    assert summary.references_removed == len(owned["place-0001.0"])
    assert summary.references == len(bank.store) == total - len(owned["place-0001.0"]) + len(long)
    assert summary.bytes_written > 0 and summary.store_bytes > 0
    entry = bank.manifest["edits"][-1]
    assert entry["replaced"] == [doc, "place-0001.0"] and entry["removed"] == owned["place-0001.0"]
    assert bank.manifest["next_id"] == next_id + len(long)
    bank.store.close()
    check_consistent(folder)
    assert not (folder / JOURNAL).exists() and (folder / "done.json").is_file()


def test_deleting_documents_removes_them_from_store_and_index(parts, tmp_path):
    folder = copy_of(parts, "one", tmp_path)
    before = open_bank(folder)
    owned = document_references(before.store)
    gone = owned["person-0002.0"] + owned["organisation-0000.1"]
    texts = [bytes(r.ids).decode() for r in before.store.references(gone)]
    total = len(before.store)
    before.store.close()
    summary = edit_bank(
        folder, model=parts["model"], tokenizer=parts["tokenizer"],
        delete=["person-0002.0", "organisation-0000.1"],
    )  # fmt: skip
    assert summary.documents_deleted == 2 and summary.references_written == 0
    assert summary.references_removed == len(gone) and summary.references == total - len(gone)
    bank = open_bank(folder)
    assert not set(gone) & set(bank.store.ids().tolist())
    assert "person-0002.0" not in document_references(bank.store)
    assert all(not all_hits(bank, t) & set(gone) for t in texts)
    with pytest.raises(UserError, match="is not in"):
        bank.store.read(gone[:1])
    bank.store.close()
    check_consistent(folder)
    # ids of deleted documents are never given out again
    edit_bank(
        folder, model=parts["model"], tokenizer=parts["tokenizer"], replace={"person-0003.0": LONG}
    )
    bank = open_bank(folder)
    assert min(document_references(bank.store)["person-0003.0"]) >= total
    bank.store.close()


def test_a_sharded_bank_is_edited_by_a_layer_over_its_shards(parts, tmp_path):
    folder = copy_of(parts, "two", tmp_path)
    built = {p.name: p.read_bytes() for p in folder.glob("store-rank*.h5")}
    before = open_bank(folder)
    assert isinstance(before.store, ShardedStore)
    owned = document_references(before.store)
    next_id = int(before.store.ids().max()) + 1
    before.store.close()
    edit_bank(
        folder, model=parts["model"], tokenizer=parts["tokenizer"],
        replace=[("person-0001.0", LONG)], delete=["place-0000.0"],
    )  # fmt: skip
    assert {p.name: p.read_bytes() for p in folder.glob("store-rank*.h5")} == built
    bank = open_bank(folder)
    assert isinstance(bank.store, LayeredStore)
    new = document_references(bank.store)["person-0001.0"]
    assert new == list(range(next_id, next_id + len(cut(LONG))))
    with HDF5Store(folder / bank.manifest["edits"][0]["layer"]) as layer:
        assert layer.ids().tolist() == new
    assert_same(bank.store.read(new), encoded(parts, cut(LONG)))
    assert not set(owned["place-0000.0"] + owned["person-0001.0"]) & set(bank.store.ids().tolist())
    bank.store.close()
    check_consistent(folder)


def _contents(folder: Path) -> tuple:
    """What a reader of the bank sees: ids, memories, provenance, search results."""
    bank = open_bank(folder)
    ids = bank.store.ids()
    memory = bank.store.read(ids)
    probe = bank.embedder.embed([LONG[:32], SAME_COUNT[:32], "Ashgrove"])
    found = bank.index.search(probe, 5).ids
    seen = (ids.tolist(), memory.keys.float(), memory.values.float(),
            bank.store.references(ids), found.tolist())  # fmt: skip
    bank.store.close()
    return seen


def assert_same_contents(got: tuple, want: tuple) -> None:
    assert got[0] == want[0] and got[3] == want[3] and got[4] == want[4]
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=0)


EDIT = {"replace": {"person-0004.1": LONG, "person-0005.0": SAME_COUNT}, "delete": ["place-0002.1"]}


def test_an_edit_stopped_before_its_commit_leaves_the_bank_as_it_was(
    parts, tmp_path, monkeypatch, capsys
):
    import m3.bank.edit

    clean = copy_of(parts, "one", tmp_path / "clean")
    edit_bank(clean, model=parts["model"], tokenizer=parts["tokenizer"], **EDIT)
    for broken in ("layer", "index", "commit"):
        folder = copy_of(parts, "one", tmp_path / broken)
        before, seen = _bank_state(folder), _contents(folder)
        target, name = {
            "layer": (HDF5Store, "write"), "index": (ExactIndex, "save"),
            "commit": (m3.bank.edit, "commit"),
        }[broken]  # fmt: skip

        def failing(*args, **kwargs):
            raise RuntimeError("simulated crash")

        with monkeypatch.context() as patch:
            patch.setattr(target, name, failing)
            with pytest.raises(RuntimeError, match="simulated crash"):
                edit_bank(folder, model=parts["model"], tokenizer=parts["tokenizer"], **EDIT)
        assert (folder / "manifest.json").read_bytes() == before["manifest.json"]
        assert_same_contents(_contents(folder), seen)  # the bank as it was, opened as complete
        assert verify_bank(folder, progress=False).ok
        assert main(["edit", str(folder), "--resume"]) == 0  # clears what the edit left
        assert "no interrupted edit" in capsys.readouterr().out
        assert _bank_state(folder) == before
        edit_bank(folder, model=parts["model"], tokenizer=parts["tokenizer"], **EDIT)
        assert_same_contents(_contents(folder), _contents(clean))
        check_consistent(folder)


def test_an_earlier_m3s_interrupted_in_place_edit_is_finished_by_resume(parts, tmp_path, capsys):
    from m3.bank.journal import write_journal

    folder = copy_of(parts, "one", tmp_path)
    bank = open_bank(folder)
    owned = document_references(bank.store)
    manifest = json.loads(json.dumps(bank.manifest))
    embedder = bank.embedder
    bank.store.close()
    # what the earlier m3 journaled: one document rewritten in place, one deleted
    doc = next(d for d, ids in owned.items() if len(ids) == len(cut(SAME_COUNT)))
    new = cut(SAME_COUNT, doc)
    removed = owned["place-0002.1"]
    manifest["references"] -= len(removed)
    manifest["shards"][0]["references"] -= len(removed)
    manifest["edits"] = [{"replaced": [doc], "deleted": ["place-0002.1"],
                          "written": owned[doc], "removed": removed}]  # fmt: skip
    plan = {"replaced": [doc], "deleted": ["place-0002.1"], "written": owned[doc],
            "removed": removed, "bytes_written": 1, "manifest": manifest}  # fmt: skip
    memory = encoded(parts, new)
    write_journal(folder, plan, memory, new, embedder.embed([bytes(r.ids).decode() for r in new]))
    with pytest.raises(UserError, match="an edit was interrupted"):
        open_bank(folder)
    assert main(["build-memory", BASE, BANK, *SMALL, parts["weights"], f"output={folder}"]) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(UserError, match="interrupted edit"):
        edit_bank(folder, model=parts["model"], tokenizer=parts["tokenizer"], delete=["x"])
    summary = resume_edit(folder)
    assert summary is not None and summary.documents_replaced == 1
    assert resume_edit(folder) is None
    bank = open_bank(folder)
    now = document_references(bank.store)
    assert now[doc] == owned[doc] and "place-0002.1" not in now
    assert_same(bank.store.read(now[doc]), memory)
    bank.store.close()
    check_consistent(folder)


def test_bad_inputs_name_the_document(parts, tmp_path):
    folder = copy_of(parts, "one", tmp_path)
    model, tokenizer = parts["model"], parts["tokenizer"]
    with pytest.raises(UserError, match="document 'nope' is not in the bank"):
        edit_bank(folder, model=model, tokenizer=tokenizer, replace={"nope": "text"})
    with pytest.raises(UserError, match="document 'gone' is not in the bank"):
        edit_bank(folder, model=model, tokenizer=tokenizer, delete=["gone"])
    with pytest.raises(UserError, match=r"document 'person-0000\.0': the new text is empty"):
        edit_bank(folder, model=model, tokenizer=tokenizer, replace={"person-0000.0": " \n"})
    with pytest.raises(UserError, match=r"'person-0000\.0' is named twice"):
        edit_bank(
            folder, model=model, tokenizer=tokenizer,
            replace={"person-0000.0": "x"}, delete=["person-0000.0"],
        )  # fmt: skip
    with pytest.raises(UserError, match="nothing to edit"):
        edit_bank(folder, model=model, tokenizer=tokenizer)
    huge = "word " * 200_001  # a corpus on one line: refused before any encoding
    with pytest.raises(UserError, match=r"'person-0000\.0' holds 1,000,005 bytes.*limit of 1,0"):
        edit_bank(folder, model=model, tokenizer=tokenizer, replace={"person-0000.0": huge})
    with pytest.raises(UserError, match=r"more than the limit of 100 bytes"):
        edit_bank(
            folder, model=model, tokenizer=tokenizer, replace={"person-0000.0": LONG},
            max_document_bytes=100,
        )  # fmt: skip
    other = Memory3(model.config)
    with pytest.raises(UserError, match="rebuild the memory bank"):
        edit_bank(folder, model=other, tokenizer=tokenizer, delete=["person-0000.0"])
    with pytest.raises(UserError, match="no finished memory bank"):
        edit_bank(tmp_path, model=model, tokenizer=tokenizer, delete=["person-0000.0"])
    check_consistent(folder)  # nothing was changed by any of these
    assert "edits" not in open_bank(folder).manifest


def test_the_edit_command_prints_a_summary(parts, tmp_path, capsys):
    folder = copy_of(parts, "one", tmp_path)
    replace = tmp_path / "new.jsonl"
    replace.write_text(json.dumps({"id": "person-0006.0", "text": LONG}) + "\n")
    argv = ["edit", str(folder), "--replace", str(replace), "--delete", "person-0007.1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 documents replaced, 1 deleted" in out and "bytes of memories written" in out
    check_consistent(folder)
    assert main(["edit", str(folder), "--delete", "nope"]) == 2
    err = capsys.readouterr().err
    assert "document 'nope' is not in the bank" in err and "Traceback" not in err
    assert main(["edit", str(folder), "--replace", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    replace.write_text('{"id": "person-0006.0"}\n')
    assert main(["edit", str(folder), "--replace", str(replace)]) == 2
    assert "new.jsonl:1" in capsys.readouterr().err
    assert main(["edit", str(folder), "--resume"]) == 0
    assert "no interrupted edit" in capsys.readouterr().out
    # recipe files naming the bank; the weights are the ones that wrote it (its recipe's)
    recipe = [BASE, BANK, *SMALL, f"retrieval.bank={folder}", "training.init_weights=null"]
    assert main(["edit", *recipe, "--delete", "person-0008.0"]) == 0
    assert "0 documents replaced, 1 deleted" in capsys.readouterr().out
    assert main(["edit", BASE, *SMALL[:2], "--delete", "person-0008.1"]) == 2
    assert "retrieval.bank: name the memory bank folder" in capsys.readouterr().err


def test_measure_edits_edits_a_copy_and_scores_before_and_after(parts, tmp_path):
    edits = World.generate(0, **SIZES).edits(3)
    report = measure_edits(
        parts["root"] / "one", edits, model=parts["model"], tokenizer=parts["tokenizer"],
        work_dir=tmp_path, k=2,
    )  # fmt: skip
    assert report.n == 3 and report.after_score.questions == 3
    assert 0 <= report.took_effect <= 1 and 0 <= report.before <= 1
    assert report.summary.documents_replaced == sum(len(e.documents) for e in edits)
    assert "edits" not in open_bank(parts["root"] / "one").manifest  # the original is untouched
    bank = open_bank(report.bank)
    owned = document_references(bank.store)
    for document in edits[0].documents:
        stored = bank.store.references(owned[document.id])
        assert b"".join(bytes(r.ids) for r in stored).decode() == document.text
    bank.store.close()


def test_a_quantized_bank_stores_the_new_memories_as_its_codes(parts, tmp_path):
    quantized = [
        "bank.quantizer={class_path: product, init_args: {subspaces: 4, bits: 4, iterations: 5}}",
        "bank.train_references=12",
    ]
    folder = tmp_path / "quantized"
    build_memory(
        load_recipe([BASE, BANK], [*SMALL, *quantized, parts["weights"], f"output={folder}"])
    )
    edit_bank(
        folder, model=parts["model"], tokenizer=parts["tokenizer"],
        replace={"person-0001.1": LONG}, delete=["place-0001.0"],
    )  # fmt: skip
    bank = open_bank(folder)
    quantizer = bank.store.quantizer
    assert quantizer is not None
    new = document_references(bank.store)["person-0001.1"]
    memory = encoded(parts, cut(LONG, "person-0001.1"))
    assert_same(bank.store.read(new), quantizer.decode(quantizer.encode(memory)))
    bank.store.close()
    check_consistent(folder)


# ------------------------------------------------------------------ edits and other processes
def _bank_state(folder: Path) -> dict[str, bytes]:
    """Every file of a bank folder, byte for byte (the edit lock's pid aside)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "edit.lock"
    }


#: What a reader of a bank sees, as JSON: ids, a digest of the memories, provenance, search.
SNAPSHOT = """
import hashlib, json
def snapshot(bank):
    ids = bank.store.ids()
    memory = bank.store.read(ids)
    stored = memory.keys.float().numpy().tobytes() + memory.values.float().numpy().tobytes()
    probe = bank.embedder.embed(["Orlen Bask repaired clocks", "Quorra Valdemine sold lanterns"])
    return json.dumps({
        "ids": ids.tolist(), "memory": hashlib.sha256(stored).hexdigest(),
        "references": [list(r.ids) for r in bank.store.references(ids)],
        "found": bank.index.search(probe, 5).ids.tolist(),
    })
"""
#: A reader in its own process: opens the bank once, prints what it sees per line of stdin.
READER = (
    SNAPSHOT
    + """
import sys
from m3.bank.open import open_bank
bank = open_bank(sys.argv[1])
print(snapshot(bank), flush=True)
for line in sys.stdin:
    print(snapshot(bank), flush=True)
"""
)


def _snapshot(folder: Path) -> dict:
    scope: dict = {}
    exec(SNAPSHOT, scope)
    bank = open_bank(folder)
    try:
        return json.loads(scope["snapshot"](bank))
    finally:
        bank.store.close()


def _new_reader(folder: Path) -> dict:
    """What a process that opens the bank now sees."""
    done = subprocess.run([sys.executable, "-c", READER, str(folder)], cwd=ROOT, input="",
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout)


def test_readers_see_the_bank_before_or_after_an_edit_never_a_mix_or_an_error(
    parts, tmp_path, monkeypatch
):
    import m3.bank.edit

    folder = copy_of(parts, "one", tmp_path)
    old = _snapshot(folder)
    early = subprocess.Popen([sys.executable, "-c", READER, str(folder)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip

    def ask_early() -> dict:
        early.stdin.write("again\n")
        early.stdin.flush()
        return json.loads(early.stdout.readline())

    during: dict[str, dict] = {}
    real_commit = m3.bank.edit.commit

    def watched_commit(bank_folder: Path, manifest: dict) -> None:
        # every file of the edit is written; the manifest still names the old bank
        during["new reader"], during["early reader"] = _new_reader(folder), ask_early()
        real_commit(bank_folder, manifest)

    replacement = tmp_path / "new.jsonl"
    replacement.write_text(json.dumps({"id": "person-0006.0", "text": LONG}) + "\n")
    try:
        assert json.loads(early.stdout.readline()) == old
        monkeypatch.setattr(m3.bank.edit, "commit", watched_commit)
        argv = ["edit", str(folder), "--replace", str(replacement), "--delete", "person-0007.1"]
        assert main(argv) == 0
        new = _snapshot(folder)
        assert new["ids"] != old["ids"] and new["references"] != old["references"]
        assert during == {"new reader": old, "early reader": old}
        assert ask_early() == old  # its bank, whole, although the edit replaced the index
        assert _new_reader(folder) == new
    finally:
        early.communicate("")
    assert early.returncode == 0
    check_consistent(folder)


@pytest.mark.slow
def test_an_edit_killed_at_any_moment_leaves_the_old_bank_or_the_new_one(parts, tmp_path):
    folder = copy_of(parts, "one", tmp_path / "killed")
    clean = copy_of(parts, "one", tmp_path / "clean")
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(
        "".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in EDIT["replace"].items())
    )
    argv = ["edit", "--replace", str(replacement), "--delete", *EDIT["delete"]]
    edit_bank(clean, model=parts["model"], tokenizer=parts["tokenizer"], **EDIT)
    old, new = _snapshot(folder), _snapshot(clean)
    command = [sys.executable, "-m", "m3", argv[0], str(folder), *argv[1:]]
    lengths = []
    for _ in range(2):  # the edit's length, on a copy: kills then fall inside it
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        lengths.append(time.perf_counter() - start)
        shutil.rmtree(folder)
        shutil.copytree(parts["root"] / "one", folder)
    outcomes = []
    delays = list(np.random.default_rng(0).uniform(0.5, 0.95, size=6) * min(lengths))
    sooner = 4  # times the kills start over, sooner, when the edit ran faster than timed
    while delays:
        delay = delays.pop(0)
        run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            run.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGKILL)
            run.wait()
        seen = _snapshot(folder)
        assert seen in (old, new)
        outcomes.append("new" if seen == new else "old")
        if seen == new and "old" not in outcomes and sooner:
            # every kill so far struck past the commit: from the old bank again, sooner
            sooner -= 1
            shutil.rmtree(folder)
            shutil.copytree(parts["root"] / "one", folder)
            delays.insert(0, delay / 2)
        elif seen == new:
            break
    assert "old" in outcomes  # at least one kill struck before the commit
    if outcomes[-1] == "old":
        assert main([argv[0], str(folder), *argv[1:]]) == 0
    else:  # a kill after the commit may leave the index it replaced: --resume deletes it
        assert main([argv[0], str(folder), "--resume"]) == 0
    assert _snapshot(folder) == new
    check_consistent(folder)


def test_a_second_edit_during_an_edit_is_refused_cleanly(parts, tmp_path, capsys):
    from m3.bank.layers import edit_lock

    folder = copy_of(parts, "one", tmp_path)
    before = _bank_state(folder)
    script = (
        "import sys, time; from pathlib import Path; from m3.bank.layers import edit_lock\n"
        f"with edit_lock(Path({str(folder)!r})):\n"
        "    print('locked', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, cwd=ROOT)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"locked"
        for argv in (["--delete", "person-0007.1"], ["--resume"]):
            assert main(["edit", str(folder), *argv]) == 2
            err = capsys.readouterr().err
            assert f"being edited by another process (pid {holder.pid})" in err
            assert "Traceback" not in err
        assert _bank_state(folder) == before
    finally:
        holder.communicate(b"")
    with edit_lock(folder):  # released when its holder ended
        pass


def test_two_concurrent_edit_commands_never_leave_a_traceback_or_a_stale_folder(parts, tmp_path):
    folder = copy_of(parts, "one", tmp_path)
    commands = [
        [sys.executable, "-m", "m3", "edit", str(folder), "--delete", doc]
        for doc in ("person-0007.1", "person-0008.0")
    ]
    runs = [subprocess.Popen(c, cwd=ROOT, stderr=subprocess.PIPE, text=True) for c in commands]
    outcomes = [(run.wait(), run.stderr.read()) for run in runs]
    for code, err in outcomes:
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert "being edited by another process" in err
    assert 0 in [code for code, _ in outcomes]
    check_consistent(folder)  # no file an edit left behind that the manifest does not name
