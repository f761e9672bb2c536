"""The reference table: the same references, by id, as `read_knowledge`, written in shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.bank.inputs import knowledge_fingerprint
from m3.bank.knowledge import read_knowledge
from m3.bank.table import ReferenceTable, write_table
from m3.core.errors import UserError
from m3.data.chunking import FixedChunker, chunk_documents
from m3.data.documents import Document
from m3.data.sources import FilesSource
from m3.data.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ByteTokenizer()


def listed(documents: list[Document], max_tokens: int) -> list:
    """The slow, obviously right references: every document encoded, then cut."""
    return chunk_documents(
        [(d.id, TOKENIZER.encode(d.text) if d.text.strip() else []) for d in documents],
        FixedChunker(max_tokens),
    )


texts = st.text(alphabet=st.sampled_from("ab c\nüé字"), max_size=40)
documents = st.lists(
    st.tuples(st.one_of(st.integers(0, 99), st.text("xyz", min_size=1, max_size=3)), texts),
    max_size=14,
    unique_by=lambda d: str(d[0]),
)


@settings(max_examples=60, deadline=None)
@given(documents, st.integers(1, 9), st.integers(1, 5), st.integers(0, 3), st.integers(1, 3))
def test_the_table_holds_the_references_read_knowledge_gives(
    tmp_path_factory, docs, max_tokens, per_shard, rank, world
) -> None:
    folder = tmp_path_factory.mktemp("table") / "references"
    docs = [Document(i, t) for i, t in docs]
    table = write_table(
        folder, docs, TOKENIZER, chunker=FixedChunker(max_tokens), rank=rank, world=world,
        documents_per_shard=per_shard,
    )  # fmt: skip
    want = listed(docs, max_tokens)
    assert len(table) == len(want) and list(table) == want
    assert table[1:4] == want[1:4] and (not want or table[-1] == want[-1])
    assert table.lengths().tolist() == [len(r.ids) for r in want]
    assert table.knowledge == knowledge_fingerprint(want)
    assert table.documents == len({r.doc_id for r in want})
    assert table.documents + table.skipped == len(docs)
    assert all(type(r.doc_id) is type(d.id) for r in table for d in docs if d.id == r.doc_id)
    with pytest.raises(IndexError):
        table[len(want)]
    reopened = ReferenceTable(folder)
    assert list(reopened) == want and reopened.manifest == table.manifest


def test_ids_are_read_knowledges_on_the_test_world(tmp_path) -> None:
    from m3.data.world import World

    world = World.generate(0, n_people=30, n_places=8, n_orgs=8)
    kb = tmp_path / "kb.jsonl"
    world.write(tmp_path)  # writes kb.jsonl among the world's files
    source = FilesSource([kb])
    chunker = FixedChunker(48)
    knowledge = read_knowledge([source], TOKENIZER, chunker=chunker)
    from m3.bank.knowledge import read_documents

    docs, skipped = read_documents([source])
    table = write_table(tmp_path / "t", docs, TOKENIZER, chunker=chunker, skipped=skipped,
                        documents_per_shard=7)  # fmt: skip
    assert list(table) == knowledge.references
    assert (table.documents, table.skipped) == (knowledge.documents, knowledge.skipped)
    assert len(table.manifest["shards"]) == -(-len(docs) // 7)
    # the continual stage's pairing reads the same references, under the same ids, from the
    # table it writes next to its pairing file; and its pairing file is the one the
    # references cut in memory give
    import torch

    from m3.retrieval.embedders import HashedNgramEmbedder
    from m3.training.datamodule import TextDataModule
    from m3.training.pairing import pairing_table

    def data(pairing_file: Path) -> TextDataModule:
        return TextDataModule(
            TOKENIZER, [FilesSource([tmp_path / "train.jsonl"])], knowledge=[source],
            chunker=chunker, embedder=HashedNgramEmbedder(dim=256), seq_length=64,
            batch_size=2, chunk_length=64, pairing_file=pairing_file,
        )  # fmt: skip

    paired = data(tmp_path / "run" / "pairing.pt")
    paired.setup()
    assert isinstance(paired.references, ReferenceTable)
    assert paired.references.folder == pairing_table(tmp_path / "run" / "pairing.pt")
    assert list(paired.references) == knowledge.references
    in_memory = data(tmp_path / "old" / "pairing.pt")
    in_memory.references = in_memory.build_references()  # as before the table
    in_memory.setup()
    assert isinstance(in_memory.references, list)
    new = torch.load(tmp_path / "run" / "pairing.pt", weights_only=True)
    old = torch.load(tmp_path / "old" / "pairing.pt", weights_only=True)
    assert new.keys() == old.keys() and new["fingerprint"] == old["fingerprint"]
    assert torch.equal(new["train"], old["train"]) and torch.equal(new["val"], old["val"])
    assert (new["train"] >= 0).any()
    # a second run keeps the table and accepts the pairing file
    stamp = (paired.references.folder / "shard-00000" / "tokens.npy").stat().st_mtime_ns
    again = data(tmp_path / "run" / "pairing.pt")
    again.setup()
    assert (again.references.folder / "shard-00000" / "tokens.npy").stat().st_mtime_ns == stamp
    assert torch.equal(again.train_set.pairing, new["train"])


def test_a_finished_table_is_kept_and_one_of_other_documents_replaced(tmp_path) -> None:
    docs = [Document(f"d{i}", f"text number {i} " * 3) for i in range(10)]
    folder = tmp_path / "references"
    write_table(folder, docs, TOKENIZER, chunker=FixedChunker(8), documents_per_shard=3)
    stamp = (folder / "shard-00001" / "tokens.npy").stat().st_mtime_ns
    again = write_table(folder, docs, TOKENIZER, chunker=FixedChunker(8), documents_per_shard=3)
    assert (folder / "shard-00001" / "tokens.npy").stat().st_mtime_ns == stamp  # kept
    changed = [*docs[:4], Document("d4", "another text entirely"), *docs[5:]]
    table = write_table(folder, changed, TOKENIZER, chunker=FixedChunker(8), documents_per_shard=3)
    assert list(table) == listed(changed, 8) and table.knowledge != again.knowledge
    other = write_table(folder, changed, TOKENIZER, chunker=FixedChunker(5), documents_per_shard=3)
    assert list(other) == listed(changed, 5)


def test_a_killed_writer_leaves_nothing_that_reads_as_a_table(tmp_path) -> None:
    docs = [Document(f"d{i}", "word " * 200) for i in range(400)]
    (tmp_path / "docs.json").write_text(json.dumps([list(d) for d in docs]))
    script = (
        "import json, sys; from pathlib import Path\n"
        "from m3.bank.table import write_table\n"
        "from m3.data.chunking import FixedChunker\n"
        "from m3.data.documents import Document\n"
        "from m3.data.tokenizer import ByteTokenizer\n"
        f"rows = json.loads(Path({str(tmp_path / 'docs.json')!r}).read_text())\n"
        "docs = [Document(*d) for d in rows]\n"
        "print('start', flush=True)\n"
        f"write_table(Path({str(tmp_path / 'references')!r}), docs, ByteTokenizer(), "
        "chunker=FixedChunker(16), documents_per_shard=20)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE)
    assert run.stdout.readline().strip() == b"start"
    while not list((tmp_path / "references").glob("shard-0000[2-9]")):  # a few shards in
        assert run.poll() is None, "the writer finished before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    with pytest.raises(UserError, match="no finished reference table"):
        ReferenceTable(tmp_path / "references")
    table = write_table(tmp_path / "references", docs, TOKENIZER, chunker=FixedChunker(16),
                        documents_per_shard=20)  # fmt: skip
    assert list(table) == listed(docs, 16)
    assert not list((tmp_path / "references").glob("*.tmp"))


def test_a_damaged_table_is_named(tmp_path) -> None:
    docs = [Document(f"d{i}", f"text {i}") for i in range(5)]
    folder = tmp_path / "references"
    write_table(folder, docs, TOKENIZER, chunker=FixedChunker(4), documents_per_shard=2)
    (folder / "shard-00001" / "offsets.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="a shard of the reference table is damaged"):
        ReferenceTable(folder)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="is not a reference table manifest"):
        ReferenceTable(folder)
    assert np.array_equal(  # and a writer replaces it whole
        write_table(folder, docs, TOKENIZER, chunker=FixedChunker(4)).lengths(),
        [len(r.ids) for r in listed(docs, 4)],
    )
