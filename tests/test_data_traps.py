"""Silent data traps: refused before any work, naming the place, and leaving no folder claimed.

- two documents with the same id (a bank's documents are edited and deleted by id);
- a document longer than its source's `max_document_bytes` (one huge line);
- too little text for one training batch (which trained "0 steps" and wrote model.pt);
- a refused `m3 fit` / `m3 build-memory` claimed its output folder, so that the corrected
  recipe was refused without `--overwrite`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m3.bank.knowledge import read_knowledge
from m3.cli import main
from m3.core.errors import UserError
from m3.data.chunking import FixedChunker
from m3.data.documents import MAX_DOCUMENT_BYTES, read_corpus
from m3.data.sources import FilesSource, WorldSource, gather
from m3.data.tokenizer import ByteTokenizer
from m3.training.datamodule import TextDataModule

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes/tiny/base.yaml")
WARMUP = str(ROOT / "recipes/tiny/warmup.yaml")
BUILD = str(ROOT / "recipes/tiny/build-memory.yaml")
FAST = [
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "data.seq_length=64",
]  # fmt: skip
SENTENCE = "The lighthouse keeper of Omaren counted ships until the fog rolled in. "


def jsonl(path: Path, *records: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def files(*paths: Path, **init_args) -> str:
    """A recipe's list of one `files` source, as an override value."""
    args = {"paths": [str(p) for p in paths], **init_args}
    return json.dumps([{"class_path": "files", "init_args": args}])


# --------------------------------------------------------------------------- duplicate ids
def test_the_same_jsonl_id_twice_in_one_file_is_refused_naming_both_lines(tmp_path):
    kb = jsonl(
        tmp_path / "kb.jsonl",
        {"id": "dup", "text": "First fact."},
        {"id": "other", "text": "Second fact."},
        {"id": "dup", "text": "Third fact."},
    )
    with pytest.raises(UserError) as refused:
        read_corpus([kb])
    message = str(refused.value)
    assert "document id 'dup' is given twice" in message
    assert f"{kb}:1" in message and f"{kb}:3" in message


def test_the_same_jsonl_id_in_two_files_is_refused_naming_both_files(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", {"id": "dup", "text": "First fact."})
    b = jsonl(tmp_path / "b.jsonl", {"id": "x", "text": "Other."}, {"id": "dup", "text": "Two."})
    with pytest.raises(UserError, match="'dup' is given twice") as refused:
        read_corpus([tmp_path])
    assert f"{a}:1" in str(refused.value) and f"{b}:2" in str(refused.value)


def test_the_number_1_and_the_string_1_are_the_same_id(tmp_path):
    kb = jsonl(tmp_path / "kb.jsonl", {"id": 1, "text": "One."}, {"id": "1", "text": "Uno."})
    with pytest.raises(UserError) as refused:
        read_corpus([kb])
    message = str(refused.value)
    assert "document id '1' is given twice" in message
    assert f'{kb}:1 ("id": 1)' in message and f'{kb}:2 ("id": "1")' in message


def test_ids_that_are_not_strings_or_integers_are_refused(tmp_path):
    for raw in (None, True, 1.5, ["a"]):
        kb = jsonl(tmp_path / "kb.jsonl", {"id": raw, "text": "A fact."})
        with pytest.raises(UserError, match=r"kb.jsonl:1: the id must be a string or an integer"):
            read_corpus([kb])


def test_text_files_of_the_same_name_in_two_folders_are_refused(tmp_path):
    """A plain-text file's id stays its file name (the ids of existing banks): refuse."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.txt").write_text(f"Text of folder {folder}.")
    with pytest.raises(UserError, match=r"document id 'x\.txt' is given twice") as refused:
        read_corpus([tmp_path])
    message = str(refused.value)
    assert str(tmp_path / "a" / "x.txt") in message and str(tmp_path / "b" / "x.txt") in message
    assert "its id is its file name" in message
    # ids are unchanged where they do not collide
    (tmp_path / "b" / "x.txt").rename(tmp_path / "b" / "y.txt")
    assert [d.id for d in read_corpus([tmp_path]).documents] == ["x.txt", "y.txt"]


def test_jsonl_files_without_ids_of_the_same_name_collide_too(tmp_path):
    a = jsonl(tmp_path / "a" / "kb.jsonl", {"text": "One."})
    b = jsonl(tmp_path / "b" / "kb.jsonl", {"text": "Two."})
    with pytest.raises(UserError, match=r"'kb\.jsonl:1' is given twice") as refused:
        read_corpus([tmp_path])
    assert f"{a}:1" in str(refused.value) and f"{b}:1" in str(refused.value)
    assert [d.id for d in read_corpus([a]).documents] == ["kb.jsonl:1"]


def test_duplicate_ids_across_sources_are_refused_before_tokenizing(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", {"id": "dup", "text": "One."})
    b = jsonl(tmp_path / "b.jsonl", {"id": "dup", "text": "Two."})
    sources = [FilesSource([a]), FilesSource([b])]
    with pytest.raises(UserError, match="'dup' is given twice") as refused:
        gather(sources)
    assert f"{a}:1" in str(refused.value) and f"{b}:1" in str(refused.value)

    class Refusing(ByteTokenizer):
        def encode(self, text: str) -> list[int]:
            raise AssertionError("tokenized before the ids were checked")

    with pytest.raises(UserError, match=r"data.knowledge: document id 'dup' is given twice"):
        read_knowledge(sources, Refusing(), chunker=FixedChunker(32))
    # a generated source is placed by its description and position
    world = WorldSource("kb", n_people=6, n_places=6, n_orgs=6)
    first = next(iter(world.documents()))
    copy = jsonl(tmp_path / "copy.jsonl", {"id": first.id, "text": "A copy."})
    with pytest.raises(UserError, match=rf"'{first.id}' is given twice: at world kb .*document 1"):
        read_knowledge([world, FilesSource([copy])], ByteTokenizer(), chunker=FixedChunker(32))


def test_build_memory_refuses_duplicate_ids_and_claims_no_folder(tmp_path, capsys):
    """`m3 edit --delete dup` would remove two unrelated documents: refuse the build."""
    from m3.model.memory3 import Memory3
    from m3.recipes import load_recipe

    kb = jsonl(
        tmp_path / "kb.jsonl",
        {"id": "dup", "text": "The river Sorrel flows north through Quillfield."},
        {"id": "dup", "text": "Marrow Industries makes copper wire in Dunmore."},
    )
    small = ["model.n_layer=2", "model.reference_length=32", "trainer.enable_progress_bar=false"]
    weights = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(Memory3(load_recipe([BASE, BUILD], small).model.config()).state_dict(), weights)
    out = tmp_path / "bank"
    common = [BASE, BUILD, *small, f"output={out}", f"training.init_weights={weights}"]
    assert main(["build-memory", *common, f"data.knowledge={files(kb)}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "document id 'dup' is given twice" in err and f"{kb}:1" in err and f"{kb}:2" in err
    assert not out.exists()
    # the corrected recipe (another knowledge-base file) builds without --overwrite
    fixed = jsonl(
        tmp_path / "fixed.jsonl",
        {"id": "sorrel", "text": "The river Sorrel flows north through Quillfield."},
        {"id": "marrow", "text": "Marrow Industries makes copper wire in Dunmore."},
    )
    assert main(["build-memory", *common, f"data.knowledge={files(fixed)}"]) == 0
    assert (out / "done.json").is_file()


# --------------------------------------------------------------------------- document size
def test_a_document_longer_than_the_limit_is_refused_naming_it(tmp_path):
    assert MAX_DOCUMENT_BYTES == 1_000_000
    line = "x" * (MAX_DOCUMENT_BYTES + 1)
    kb = jsonl(tmp_path / "kb.jsonl", {"id": "small", "text": "ok"}, {"id": "huge", "text": line})
    with pytest.raises(UserError) as refused:
        read_corpus([kb])
    message = str(refused.value)
    assert f"{kb}:2: document 'huge' holds 1,000,001 bytes" in message
    assert "limit of 1,000,000 bytes" in message and "max_document_bytes" in message
    (tmp_path / "book.txt").write_text(line)
    with pytest.raises(UserError, match=r"book.txt: document 'book.txt' holds 1,000,001 bytes"):
        read_corpus([tmp_path / "book.txt"])
    # exactly at the limit is accepted; the limit is the source's to raise
    (tmp_path / "book.txt").write_text(line[:-1])
    assert len(read_corpus([tmp_path / "book.txt"]).documents[0].text) == MAX_DOCUMENT_BYTES
    source = FilesSource([kb], max_document_bytes=2_000_000)
    assert [d.id for d in source.documents()] == ["small", "huge"]
    with pytest.raises(UserError, match="'small' holds 2 bytes of UTF-8 text, more than the"):
        list(FilesSource([kb], max_document_bytes=1).documents())


def test_the_limit_counts_utf8_bytes_not_characters(tmp_path):
    kb = jsonl(tmp_path / "kb.jsonl", {"id": "accents", "text": "é" * 600})  # 1,200 bytes
    assert next(FilesSource([kb], max_document_bytes=1200).documents()).text == "é" * 600
    with pytest.raises(UserError, match="'accents' holds 1,200 bytes"):
        list(FilesSource([kb], max_document_bytes=1199).documents())


def test_max_document_bytes_is_a_checked_recipe_key(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SENTENCE)
    assert main(["check", "-q", BASE, WARMUP, f"data.train={files(corpus)}"]) == 0
    limit = files(corpus, max_document_bytes=5_000_000)
    assert main(["check", "-q", BASE, WARMUP, f"data.train={limit}"]) == 0
    capsys.readouterr()
    for bad, problem in ((0, "must be at least 1, got 0"), ("lots", "expected int, got 'lots'")):
        value = files(corpus, max_document_bytes=bad)
        assert main(["check", "-q", BASE, WARMUP, f"data.train={value}"]) == 2
        err = capsys.readouterr().err
        assert "max_document_bytes" in err and problem in err and "Traceback" not in err


# --------------------------------------------------------------------------- too little text
def data_module(train: Path, **kwargs) -> TextDataModule:
    options = dict(seq_length=64, batch_size=4, chunk_length=32) | kwargs
    return TextDataModule(ByteTokenizer(), [FilesSource([train])], **options)


def test_too_little_training_text_for_one_batch_is_refused_with_the_numbers(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SENTENCE * 3)  # 213 bytes + EOS: 3 sequences of 64
    data = data_module(corpus, val_fraction=0)
    with pytest.raises(UserError) as refused:
        data.read_data()
    message = str(refused.value)
    assert message.startswith("data.train: the training text holds 214 tokens: 3 sequence(s)")
    assert "data.batch_size 4 sequences (4 × 64 = 256 tokens" in message
    assert data.train_set is None
    # the held-out split takes its share first
    with pytest.raises(UserError, match=r"1 of them held out .* which leaves 2; one batch needs"):
        data_module(corpus, val_fraction=0.2).setup()
    ready = data_module(corpus, batch_size=3, val_fraction=0)
    ready.setup()
    assert len(ready.train_dataloader()) == 1


def test_too_little_held_out_text_is_refused_naming_data_val(tmp_path):
    corpus, held = tmp_path / "corpus.txt", tmp_path / "held.txt"
    corpus.write_text(SENTENCE * 8)
    held.write_text("Too short.")
    data = data_module(corpus, val=[FilesSource([held])])
    with pytest.raises(UserError) as refused:
        data.read_data()
    assert str(refused.value).startswith(
        "data.val: the held-out text holds 11 tokens, fewer than one sequence of "
        "data.seq_length 64 tokens"
    )
    held.write_text(SENTENCE)  # one sequence is enough: held-out batches keep their last part
    data.read_data()


def fit(out: Path, train: str, *extra: str) -> int:
    return main(["fit", BASE, WARMUP, *FAST, f"output={out}", f"data.train={train}", *extra])


def test_fit_on_too_little_text_writes_nothing_and_the_corrected_recipe_runs(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SENTENCE * 8)  # 569 tokens: 8 sequences of 64
    out = tmp_path / "run"
    assert fit(out, files(corpus), "data.batch_size=16", "data.val_fraction=0.1") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "data.train: the training text holds 569 tokens: 8 sequence(s)" in err
    assert "data.batch_size 16 sequences (16 × 64 = 1,024 tokens" in err
    assert not out.exists()  # no folder claimed, no model.pt
    assert fit(out, files(corpus), "data.batch_size=4", "data.val_fraction=0.1") == 0
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 2 and (out / "model.pt").is_file()


def test_fit_on_bad_data_claims_no_folder(tmp_path, capsys):
    """Unreadable, duplicate or too long documents: the corrected recipe needs no --overwrite."""
    good = tmp_path / "good.txt"
    good.write_text(SENTENCE * 8)
    dup = jsonl(tmp_path / "dup.jsonl", {"id": "a", "text": SENTENCE}, {"id": "a", "text": "b"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{oops\n')
    out = tmp_path / "run"
    for train, expected in (
        (files(good, dup), "document id 'a' is given twice"),
        (files(broken), "broken.jsonl:2: malformed JSON"),
        (files(good, max_document_bytes=100), "holds 568 bytes of UTF-8 text, more than the lim"),
    ):
        assert fit(out, train, "data.batch_size=4") == 2
        err = capsys.readouterr().err
        assert expected in err and err.startswith("m3: error: data.train: ")
        assert "Traceback" not in err and not out.exists()
    assert fit(out, files(good), "data.batch_size=4") == 0
    assert (out / "done.json").is_file()
