"""The knowledge path streams: the same documents and errors as reading the sources as lists.

`KnowledgeDocuments` reads the sources anew for every pass and keeps 8 bytes per document
to find repeated ids; `write_table` cuts the stream into shards. The slow, obviously right
reference is the list-based reading m3 did before (`listed_documents`, kept here verbatim).
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3.bank.knowledge import KnowledgeDocuments, read_knowledge
from m3.bank.table import ReferenceTable, documents_fingerprint, write_table
from m3.core.errors import UserError
from m3.data.chunking import FixedChunker, chunk_documents
from m3.data.documents import Document, check_unique_ids
from m3.data.sources import FilesSource, SeenIds, TextSource, WorldSource
from m3.data.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


def listed_documents(sources) -> tuple[list[Document], int]:
    """The knowledge base read as lists, as m3 did before it streamed (the reference)."""
    corpora = []
    for source in sources:
        try:
            corpora.append(source.read())
        except UserError as error:
            if not str(error).startswith("no text in"):
                raise
            raise UserError(f"data.knowledge: the knowledge base is empty: {error}") from None
    try:
        check_unique_ids((d.id, place) for corpus in corpora for d, place in corpus.placed())
    except UserError as error:
        raise UserError(f"data.knowledge: {error}") from None
    documents = [d for corpus in corpora for d in corpus.documents]
    return documents, sum(corpus.skipped for corpus in corpora)


def outcome(read) -> tuple[str, object]:
    try:
        return "ok", read()
    except UserError as error:
        return "error", str(error)


def streamed(sources) -> tuple[list[Document], int]:
    knowledge = KnowledgeDocuments(sources)
    knowledge.check()
    return list(knowledge), knowledge.skipped


# one JSONL line: a good record, an empty one, a repeated id, malformed JSON, a bad id type,
# a document over the size limit, or undecodable bytes (the last four rarer)
LINES = st.sampled_from(
    ["good"] * 12 + ["empty"] * 2 + ["noid"] * 2 + ["dup"] * 3 + ["json", "id", "long", "bytes"]
)


def write_source(folder: Path, kinds: list[list[str]], number: int) -> Path:
    folder.mkdir(parents=True)
    for f, lines in enumerate(kinds):
        out = bytearray()
        for n, kind in enumerate(lines):
            record = {"id": f"s{number}f{f}l{n}", "text": f"fact {number} {f} {n}"}
            if kind == "empty":
                record["text"] = "  "
            elif kind == "dup":
                record["id"] = "dup"
            elif kind == "id":
                record["id"] = 1.5
            elif kind == "long":
                record["text"] = "x" * 300
            elif kind == "noid":
                del record["id"]
            line = json.dumps(record).encode()
            if kind == "json":
                line = b"{not json"
            elif kind == "bytes":
                line = line[:-2] + b'\xff"}'
            out += line + b"\n"
        (folder / f"part{f}.jsonl").write_bytes(bytes(out))
    return folder


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(st.lists(LINES, max_size=5), min_size=1, max_size=3), min_size=1,
                max_size=3))  # fmt: skip
def test_streaming_gives_the_listed_documents_and_the_same_errors(tmp_path_factory, layout):
    root = tmp_path_factory.mktemp("kb")
    sources = [
        FilesSource([write_source(root / f"source{i}", kinds, i)], max_document_bytes=200)
        for i, kinds in enumerate(layout)
    ]
    assert outcome(lambda: streamed(sources)) == outcome(lambda: listed_documents(sources))
    # a source on its own streams the documents read_corpus lists, and refuses the same
    for source in sources:
        assert outcome(lambda s=source: list(s.documents())) == outcome(
            lambda s=source: s.read().documents
        )


def test_generated_sources_stream_and_are_placed_by_position(tmp_path) -> None:
    world = WorldSource("kb", n_people=6, n_places=6, n_orgs=6)
    assert isinstance(world.documents(), Iterator)
    first = next(iter(world.documents()))
    copy = tmp_path / "copy.jsonl"
    copy.write_text(json.dumps({"id": first.id, "text": "A copy."}) + "\n")
    sources = [world, FilesSource([copy])]
    with pytest.raises(UserError) as refused:
        streamed(sources)
    with pytest.raises(UserError) as reference:
        listed_documents(sources)
    assert str(refused.value) == str(reference.value)
    assert "world kb (seed 0" in str(refused.value) and "document 1 (id" in str(refused.value)


def test_seen_ids_names_only_real_repeats() -> None:
    seen = SeenIds()
    ids = [f"d{i}" for i in range(1000)] + ["d17"]
    for doc_id in ids:
        seen.add(doc_id)
    calls = []

    def again():
        calls.append(1)
        return ((i, f"place {n}") for n, i in enumerate(ids))

    with pytest.raises(UserError, match=r"'d17' is given twice: at place 17 and at place 1000"):
        seen.check(again)
    seen.check(again, start=18)  # from the 19th on, no id repeats: no second pass
    assert len(calls) == 1


class Lazy(TextSource):
    """Documents made as they are read: nothing holds them all."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size

    def documents(self) -> Iterator[Document]:
        words = ["river", "stone", "harbour", "copper", "winter", "crane"]
        for i in range(self.count):
            text = " ".join(words[(i * 7 + j) % 6] for j in range(self.size // 6))
            yield Document(f"d{i}", f"{i}. {text}")


def test_the_table_is_written_from_a_stream_without_holding_the_texts(tmp_path) -> None:
    source = Lazy(200, 10_000)  # 2 MB of text
    knowledge = KnowledgeDocuments([source])
    chunker = FixedChunker(128)
    tracemalloc.start()
    try:
        digest = knowledge.check(TOKENIZER, chunker)
        table = write_table(tmp_path / "t", knowledge, TOKENIZER, chunker=chunker,
                            documents_per_shard=4, digest=digest,
                            count=knowledge.documents)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert knowledge.documents == 200 and len(table.manifest["shards"]) == 50
    assert digest == documents_fingerprint(list(source.documents()), TOKENIZER, chunker)
    assert peak < 2_000_000 // 2, f"{peak:,} bytes traced"  # a shard's tokens, not the text
    # the same references, by id, as the list-based reading
    want = chunk_documents([(d.id, TOKENIZER.encode(d.text)) for d in source.documents()], chunker)
    got = ReferenceTable(tmp_path / "t")
    assert len(got) == len(want) and got[0] == want[0] and got[-1] == want[-1]
    assert list(got) == want


def test_read_knowledge_streams_to_the_listed_references(tmp_path) -> None:
    kb = tmp_path / "kb.jsonl"
    kb.write_text("".join(json.dumps({"id": f"d{i}", "text": "word " * (i % 9)}) + "\n"
                          for i in range(60)))  # fmt: skip
    documents, skipped = listed_documents([FilesSource([kb])])
    want = chunk_documents(
        [(d.id, TOKENIZER.encode(d.text) if d.text.strip() else []) for d in documents],
        FixedChunker(16),
    )
    got = read_knowledge([FilesSource([kb])], TOKENIZER, chunker=FixedChunker(16))
    assert got.references == want
    given = sum(1 for d in documents if TOKENIZER.encode(d.text) and d.text.strip())
    assert (got.documents, got.skipped) == (given, skipped + len(documents) - given)
