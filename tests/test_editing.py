"""Knowledge editing: replace and delete documents of tiny banks, through the API and `m3 edit`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3.backends import ExactIndex, HDF5Store
from m3.backends.sharded import ShardedStore
from m3.bank.build import build_memory
from m3.bank.edit import (
    JOURNAL,
    document_references,
    edit_bank,
    resume_edit,
)
from m3.bank.open import open_bank
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
    shards = getattr(bank.store, "shards", [bank.store])
    assert [s["references"] for s in bank.manifest["shards"]] == [len(s) for s in shards]
    assert bank.store.verify() == []
    bank.store.close()


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


def test_a_sharded_bank_is_edited_shard_by_shard(parts, tmp_path):
    folder = copy_of(parts, "two", tmp_path)
    before = open_bank(folder)
    assert isinstance(before.store, ShardedStore)
    owned = document_references(before.store)
    next_id = int(before.store.ids().max()) + 1
    before.store.close()
    edit_bank(
        folder, model=parts["model"], tokenizer=parts["tokenizer"],
        replace=[("person-0001.0", LONG)], delete=["place-0000.0"],
    )  # fmt: skip
    bank = open_bank(folder)
    new = document_references(bank.store)["person-0001.0"]
    assert new == list(range(next_id, next_id + len(cut(LONG))))
    for shard_number, shard in enumerate(bank.store.shards):
        assert all(i % 2 == shard_number for i in shard.ids().tolist())
    assert_same(bank.store.read(new), encoded(parts, cut(LONG)))
    assert not set(owned["place-0000.0"] + owned["person-0001.0"]) & set(bank.store.ids().tolist())
    bank.store.close()
    check_consistent(folder)


def test_an_interrupted_edit_leaves_an_unfinished_bank_that_resume_completes(
    parts, tmp_path, monkeypatch, capsys
):
    edit = {
        "replace": {"person-0004.1": LONG, "person-0005.0": SAME_COUNT},
        "delete": ["place-0002.1"],
    }
    clean = copy_of(parts, "one", tmp_path / "clean")
    edit_bank(clean, model=parts["model"], tokenizer=parts["tokenizer"], **edit)

    for broken in ("write", "save"):
        folder = copy_of(parts, "one", tmp_path / broken)
        calls = {"n": 0}
        real = HDF5Store.write if broken == "write" else ExactIndex.save

        def failing(self, *args, real=real, calls=calls):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated crash")
            return real(self, *args)

        with monkeypatch.context() as patch:
            patch.setattr(HDF5Store if broken == "write" else ExactIndex, broken, failing)
            with pytest.raises(RuntimeError, match="simulated crash"):
                edit_bank(folder, model=parts["model"], tokenizer=parts["tokenizer"], **edit)
        assert (folder / JOURNAL).is_dir()
        with pytest.raises(UserError, match="no finished memory bank: an edit was interrupted"):
            open_bank(folder)
        assert main(["build-memory", BASE, BANK, *SMALL, parts["weights"], f"output={folder}"]) == 2
        assert "--resume" in capsys.readouterr().err
        with pytest.raises(UserError, match="interrupted edit"):
            edit_bank(folder, model=parts["model"], tokenizer=parts["tokenizer"], delete=["x"])
        summary = resume_edit(folder)
        assert summary is not None and summary.documents_replaced == 2
        assert resume_edit(folder) is None
        check_consistent(folder)
        got, want = open_bank(folder), open_bank(clean)
        assert torch.equal(got.store.ids(), want.store.ids())
        assert_same(got.store.read(got.store.ids()), want.store.read(want.store.ids()))
        assert got.store.references(got.store.ids()) == want.store.references(want.store.ids())
        probe = got.embedder.embed([LONG[:32], SAME_COUNT[:32]])
        assert torch.equal(got.index.search(probe, 5).ids, want.index.search(probe, 5).ids)
        got.store.close()
        want.store.close()


def test_a_crash_before_the_journal_is_committed_leaves_the_bank_unchanged(
    parts, tmp_path, monkeypatch
):
    folder = copy_of(parts, "one", tmp_path)
    manifest = (folder / "manifest.json").read_text()

    def failing(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", failing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            edit_bank(
                folder, model=parts["model"], tokenizer=parts["tokenizer"],
                replace={"person-0000.0": LONG},
            )  # fmt: skip
    assert (folder / "manifest.json").read_text() == manifest
    check_consistent(folder)  # opens as complete: nothing was applied
    assert resume_edit(folder) is None and not (folder / "edit-journal.tmp").exists()


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


def test_an_edit_while_a_reader_holds_the_bank_fails_cleanly_and_changes_nothing(
    parts, tmp_path, capsys
):
    folder = copy_of(parts, "one", tmp_path)
    before = _bank_state(folder)
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from m3.bank.open import open_bank; "
         f"b = open_bank({str(folder)!r}); b.store.read([0]); print('open', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == b"open"
        assert main(["edit", str(folder), "--delete", "person-0007.1"]) == 2
        err = capsys.readouterr().err
        assert "open in another process" in err and "nothing was changed" in err
        assert "Traceback" not in err
        assert _bank_state(folder) == before  # no journal, no marker, the same bytes
    finally:
        reader.communicate(b"")
    assert main(["edit", str(folder), "--delete", "person-0007.1"]) == 0
    check_consistent(folder)


def test_a_second_edit_during_an_edit_is_refused_cleanly(parts, tmp_path, capsys):
    from m3.bank.journal import edit_lock

    folder = copy_of(parts, "one", tmp_path)
    before = _bank_state(folder)
    script = (
        "import sys, time; from pathlib import Path; from m3.bank.journal import edit_lock\n"
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
    assert not (folder / "edit-journal").exists() and not (folder / "edit-journal.tmp").exists()
    check_consistent(folder)
