"""Reading references by id from a bank's reference table: the store, the retriever, `m3 edit`.

A bank opened with its table (`m3.bank.open`) serves every id's provenance from the table and
the ids an edit wrote from the edit's layer; a bank without a table (built before it existed)
serves them from its shards, through h5py. Both must give the same references, and so the
same retrievals and the same leakage-filter decisions.
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from m3.backends.hdf5_store import HDF5Store
from m3.backends.sharded import LayeredStore, ShardedStore
from m3.bank.edit import document_references, edit_bank
from m3.bank.layout import TABLE
from m3.bank.open import open_bank
from m3.bank.table import ReferenceTable, write_table
from m3.data.chunking import FixedChunker
from m3.data.documents import Document
from m3.data.tokenizer import ByteTokenizer
from m3.retrieval.retriever import Retriever

TOKENIZER = ByteTokenizer()
#: 47 bytes: as many 32-token references (2) as `person-0002.0`, so the edit keeps its ids
SAME_COUNT = "Quorra Valdemine sold lanterns in Ashgrove Bay."
#: 178 bytes: more references than `person-0001.0`, so the edit gives them new ids
LONG = (
    "Orlen Bask repaired clocks on the pier at dawn. His sister Mirel sold the brass gears "
    "to sailors from Tarnwick, who paid in salted fish and amber beads every second winter."
)


def copy_bank(tiny_bank, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_bank.folder, folder)
    return folder


def without_table(folder: Path, tmp_path: Path, name: str) -> Path:
    """A copy of a bank as m3 built it before the reference table existed."""
    old = tmp_path / name
    shutil.copytree(folder, old)
    shutil.rmtree(old / TABLE)
    return old


def retriever(bank, threshold: float | None) -> Retriever:
    return Retriever(
        embedder=bank.embedder, index=bank.index, store=bank.store, tokenizer=TOKENIZER,
        k=5, threshold=threshold, cache_size=0, chunk_length=64,
        expected_embedder_fingerprint=str(bank.manifest["embedder"]["fingerprint"]),
    )  # fmt: skip


def contexts(tiny_bank, *extra: str) -> list[list[int]]:
    """Contexts that quote the knowledge base (leaking references) and ones that do not."""
    kb = [d.text for d in tiny_bank.world.knowledge_base()]
    texts = [" ".join(kb[i : i + 6]) for i in range(0, len(kb), 6)]
    texts += [d.text for d in tiny_bank.world.heldout_documents()][:4]
    texts += [f"{t} {t}" for t in extra]  # an edit's new text, quoted twice over
    return [[TOKENIZER.bos_id, *TOKENIZER.encode(t)][:512] for t in texts]


def retrieved(bank, threshold: float | None, rows: list[list[int]]) -> tuple:
    found = retriever(bank, threshold).retrieve_context(rows)
    step = retriever(bank, threshold).retrieve_next(rows)
    return found.ids, found.scores, found.memories.keys, step.ids


def assert_same_retrievals(new, old, threshold: float | None, rows: list[list[int]]) -> None:
    got, want = retrieved(new, threshold, rows), retrieved(old, threshold, rows)
    assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def test_an_opened_bank_reads_provenance_from_its_table(tiny_bank) -> None:
    bank = open_bank(tiny_bank.folder)
    try:
        assert isinstance(bank.store, ShardedStore) and bank.store.table is not None
        ids = bank.store.ids()
        assert ids.tolist() == list(range(len(bank.store.table)))
        [shard_file] = [s["file"] for s in bank.manifest["shards"]]
        with HDF5Store(tiny_bank.folder / shard_file) as shard:
            from_h5py = shard.references(ids)
        assert bank.store.references(ids) == from_h5py
        tokens = bank.store.reference_tokens(ids.flip(0))
        assert [t.tolist() for t in tokens] == [list(r.ids) for r in from_h5py[::-1]]
        # pickled (a DataLoader worker, a retriever sent to a process): the table by its folder
        data = pickle.dumps(bank.store)
        assert len(data) < 4096
        assert pickle.loads(data).references(ids[:7]) == from_h5py[:7]
    finally:
        bank.store.close()


def test_a_bank_built_before_the_table_retrieves_the_same_ids_and_filters_the_same(
    tiny_bank, tmp_path
) -> None:
    old_folder = without_table(tiny_bank.folder, tmp_path, "old")
    new, old = open_bank(tiny_bank.folder), open_bank(old_folder)
    try:
        assert isinstance(old.store, HDF5Store)  # as m3 opened banks before the table
        assert old.store.references(old.store.ids()) == new.store.references(new.store.ids())
        rows = contexts(tiny_bank)
        for threshold in (2 / 3, 0.3, None):
            assert_same_retrievals(new, old, threshold, rows)
        # the filter does drop references here, so the comparison says something
        off, on = retrieved(new, None, rows)[0], retrieved(new, 2 / 3, rows)[0]
        assert not torch.equal(off, on)
    finally:
        new.store.close()
        old.store.close()


@pytest.fixture(scope="module")
def edited(tiny_bank, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny bank after an edit, and the same bank without its table."""
    from m3.model.checkpoints import load_weights
    from m3.model.memory3 import Memory3

    root = tmp_path_factory.mktemp("edited")
    folder = root / "bank"
    shutil.copytree(tiny_bank.folder, folder)
    model = Memory3(tiny_bank.recipe.model.config())
    load_weights(model, tiny_bank.weights)
    edit_bank(
        folder, model=model, tokenizer=TOKENIZER,
        replace={"person-0002.0": SAME_COUNT, "person-0001.0": LONG}, delete=["place-0000.0"],
    )  # fmt: skip
    return folder, without_table(folder, root, "old")


def test_an_edited_bank_serves_the_edits_references_from_their_layer(tiny_bank, edited) -> None:
    folder, old_folder = edited
    new, old = open_bank(folder), open_bank(old_folder)
    try:
        assert isinstance(new.store, LayeredStore) and new.store.table is not None
        assert old.store.table is None
        ids = new.store.ids()
        assert torch.equal(ids, old.store.ids())
        assert new.store.references(ids) == old.store.references(ids)
        got = [t.tolist() for t in new.store.reference_tokens(ids)]
        assert got == [t.tolist() for t in old.store.reference_tokens(ids)]
        # the rewritten ids are served from the layer, not from the table's older text
        rewritten = document_references(new.store)["person-0002.0"]
        table = new.store.table
        by_id = dict(zip(ids.tolist(), got, strict=True))
        assert all(list(table[i].ids) != by_id[i] for i in rewritten)
        assert [bytes(by_id[i]).decode() for i in rewritten] == [SAME_COUNT[:32], SAME_COUNT[32:]]
        rows = contexts(tiny_bank, SAME_COUNT, LONG)
        for threshold in (2 / 3, None):
            assert_same_retrievals(new, old, threshold, rows)
        # a text quoting an edit's new text: its references (read from the layer) leak
        longer = document_references(new.store)["person-0001.0"]
        for row, own in zip(rows[-2:], (rewritten, longer), strict=True):
            off = retriever(new, None).retrieve_context([row]).ids
            on = retriever(new, 2 / 3).retrieve_context([row], leak_texts=[row]).ids
            assert set(own) & set(off.flatten().tolist())
            assert not set(own) & set(on.flatten().tolist())
    finally:
        new.store.close()
        old.store.close()


def test_the_named_documents_references_equal_a_full_scan(edited) -> None:
    for folder in edited:
        bank = open_bank(folder)
        try:
            everything = document_references(bank.store)
            named = [
                "person-0002.0",
                "person-0001.0",
                "place-0000.0",
                "organisation-0001.0",
                "nobody",
            ]
            want = {d: everything[d] for d in named if d in everything}
            assert document_references(bank.store, named) == want
            assert "place-0000.0" not in want and len(want) == 3
        finally:
            bank.store.close()


def test_a_table_of_other_references_is_left_unused_with_a_warning(tiny_bank, tmp_path) -> None:
    folder = copy_bank(tiny_bank, tmp_path, "bank")
    shutil.rmtree(folder / TABLE)
    other = [Document(f"d{i}", f"another text {i}") for i in range(4)]
    write_table(folder / TABLE, other, TOKENIZER, chunker=FixedChunker(32))
    with pytest.warns(UserWarning, match="is not the reference table"):
        bank = open_bank(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiny bank's own table is used without a word
        good = open_bank(tiny_bank.folder)
    try:
        assert isinstance(bank.store, HDF5Store) and isinstance(good.store, ShardedStore)
        ids = good.store.ids()
        assert bank.store.references(ids) == good.store.references(ids)
    finally:
        bank.store.close()
        good.store.close()


def test_table_tokens_are_the_references_ids(tmp_path) -> None:
    docs = [Document(f"d{i}", "word " * (i + 3)) for i in range(30)]
    table = write_table(tmp_path / "t", docs, TOKENIZER, chunker=FixedChunker(7),
                        documents_per_shard=4)  # fmt: skip
    order = np.random.default_rng(0).permutation(len(table))
    assert [t.tolist() for t in table.tokens(order)] == [list(table[i].ids) for i in order]
    assert table.document_rows(["d3", "d17"]).tolist() == [
        i for i, r in enumerate(table) if r.doc_id in ("d3", "d17")
    ]
    with pytest.raises(IndexError, match=f"reference {len(table)} is not in the table"):
        table.tokens([0, len(table)])
    assert isinstance(pickle.loads(pickle.dumps(table)), ReferenceTable)
