"""Training data: reading, packing, reference pairing, collation, resumable position."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.core.errors import UserError
from m3.data.chunking import FixedChunker, Reference
from m3.data.documents import read_corpus
from m3.data.sources import FilesSource
from m3.data.tokenizer import ByteTokenizer
from m3.retrieval.embedders import HashedNgramEmbedder
from m3.retrieval.overlap import overlap
from m3.training.datamodule import (
    ContinualCollator,
    EpochSampler,
    TextDataModule,
    pack,
    pair_references,
)

FACTS = [
    "Velmora Quist was born in Tarnhollow.",
    "Orrin Dask founded the Brisk Company.",
    "Tarnhollow lies on the river Sulvey.",
    "The Brisk Company makes ropes in Omaren.",
]


@settings(max_examples=50, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(3, 50), max_size=30), min_size=1, max_size=8),
    length=st.integers(1, 16),
)
def test_pack_keeps_the_stream_and_starts_every_sequence_with_bos(docs, length):
    stream = [t for d in docs for t in [*d, 2]]
    if len(stream) < length:
        with pytest.raises(UserError, match="fewer than one sequence"):
            pack(docs, length=length, bos_id=1, eos_id=2)
        return
    packed = pack(docs, length=length, bos_id=1, eos_id=2)
    assert packed.shape == (len(stream) // length, length + 1)
    assert (packed[:, 0] == 1).all()
    assert packed[:, 1:].flatten().tolist() == stream[: packed.shape[0] * length]


def test_read_corpus_skips_empty_documents_and_names_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("One document.")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"id": "x", "text": "Two."}) + "\n" + json.dumps({"text": ""}) + "\n"
    )
    corpus = read_corpus([tmp_path])
    assert [d.id for d in corpus.documents] == ["a.txt", "x"] and corpus.skipped == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        read_corpus([tmp_path / "bad.jsonl"])
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"latin\.txt: not UTF-8"):
        read_corpus([tmp_path / "latin.txt"])
    with pytest.raises(UserError, match=r"missing\.txt: no such file"):
        read_corpus([tmp_path / "missing.txt"])
    with pytest.raises(UserError, match="no text in"):
        read_corpus([tmp_path / "empty.txt"])


def knowledge(tokenizer):
    return [
        Reference(str(i), 0, len(tokenizer.encode(t)), tuple(tokenizer.encode(t)))
        for i, t in enumerate(FACTS)
    ]


def build_index(tokenizer, references, embedder):
    from m3.backends.exact_index import ExactIndex

    texts = [tokenizer.decode(list(r.ids)) for r in references]
    index = ExactIndex(embedder.dim)
    index.add(embedder.embed(texts), torch.arange(len(texts)))
    return index


def test_pairing_retrieves_by_chunk_text_and_skips_leaking_references():
    tokenizer = ByteTokenizer()
    references = knowledge(tokenizer)
    embedder = HashedNgramEmbedder(dim=1024)
    index = build_index(tokenizer, references, embedder)
    text = "Born in Tarnhollow, Velmora grew up. " + "Ropes were made by the Brisk Company."
    sequences = pack(
        [tokenizer.encode(text)], length=64, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id
    )
    chunk = 32
    common = dict(
        tokenizer=tokenizer, embedder=embedder, index=index, chunk_length=chunk, threshold=0.9
    )
    pairing = pair_references(sequences, references, **common)
    assert pairing.tolist() == [[0, 3]]
    # a reference copied verbatim into the sequence leaks and is skipped for the next hit
    copied = pack(
        [tokenizer.encode(FACTS[0] + " " * 40)],
        length=64,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )
    assert overlap(copied[0, :-1].tolist(), references[0].ids) > 0.9
    leaked = pair_references(copied, references, **common)
    assert leaked[0, 0] not in (0, -1)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.lists(st.integers(0, 300), max_size=6), max_size=9),
    batch=st.integers(1, 4),
    rows=st.integers(0, 3),
)
def test_the_pairing_fingerprint_is_the_digest_of_the_whole_reference_list(tokens, batch, rows):
    """Hashed a batch of references at a time, the digest pairing files have always carried."""
    import m3.training.pairing as pairing
    from m3.training.datamodule import fingerprint

    references = [Reference("d", 0, len(ids), tuple(ids)) for ids in tokens]
    train = torch.arange(rows * 5).view(rows, 5)
    held_out = torch.zeros(0, 5, dtype=torch.long)
    want = fingerprint(train, held_out, [list(r.ids) for r in references], "emb", 64, 0.9, 8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pairing, "_BATCH", batch)  # batch boundaries anywhere
        got = pairing.pairing_fingerprint(train, held_out, references, "emb", 64, 0.9, 8)
        assert got == want
        if references and list(references[-1].ids) != [301]:
            changed = [*references[:-1], Reference("d", 0, 1, (301,))]
            assert pairing.pairing_fingerprint(train, held_out, changed, "emb", 64, 0.9, 8) != want


def test_collator_encodes_each_reference_once_and_maps_chunks_to_pool_slots():
    tokenizer = ByteTokenizer()
    references = knowledge(tokenizer)
    items = [
        {"tokens": torch.arange(9), "references": torch.tensor([2, -1, 2])},
        {"tokens": torch.arange(9), "references": torch.tensor([0, 2, 3])},
    ]
    batch = ContinualCollator(references)(items)
    assert batch["reference_tokens"].shape[0] == 3  # 0, 2, 3: reference 2 once for the batch
    for b, item in enumerate(items):
        for c, ref in enumerate(item["references"].tolist()):
            slot = int(batch["slots"][b, c])
            if ref < 0:
                assert slot == -1
                continue
            unique = int(batch["pool"][b, slot])
            length = int(batch["reference_lengths"][unique])
            assert batch["reference_tokens"][unique, :length].tolist() == list(references[ref].ids)


def test_distractors_are_references_of_other_rows_read_by_every_chunk_at_no_encoding_cost():
    tokenizer = ByteTokenizer()
    references = knowledge(tokenizer)
    items = [
        {"tokens": torch.arange(9), "references": torch.tensor([0, -1])},
        {"tokens": torch.arange(9), "references": torch.tensor([1, 1])},
        {"tokens": torch.arange(9), "references": torch.tensor([2, 3])},
        {"tokens": torch.arange(9), "references": torch.tensor([-1, -1])},
    ]
    plain = ContinualCollator(references)(items)
    assert "shared" not in plain
    batch = ContinualCollator(references, distractors=2, seed=5)(items)
    # nothing more to encode: distractors are references the batch encodes anyway
    assert torch.equal(batch["reference_tokens"], plain["reference_tokens"])
    assert torch.equal(batch["slots"], plain["slots"])
    own = plain["pool"]
    for b, item in enumerate(items):
        mine = set(item["references"][item["references"] >= 0].tolist())
        pool = batch["pool"][b]
        # a row's own references keep their slots, the distractors come after them
        assert torch.equal(pool[: own.shape[1]][own[b] >= 0], own[b][own[b] >= 0])
        drawn = {int(pool[m]) for m in range(pool.shape[0]) if batch["shared"][b, m]}
        assert len(drawn) == min(2, 4 - len(mine))  # 4 distinct references in the batch
        assert not drawn & {int(plain["pool"][b, m]) for m in range(own.shape[1]) if own[b, m] >= 0}
        assert all(pool[m] >= 0 for m in range(pool.shape[0]) if batch["shared"][b, m])
    # seeded by the batch: the same batch draws the same distractors in every process
    again = ContinualCollator(references, distractors=2, seed=5)(items)
    assert torch.equal(again["pool"], batch["pool"])
    assert torch.equal(again["shared"], batch["shared"])
    pools = [ContinualCollator(references, distractors=1, seed=s)(items)["pool"] for s in range(8)]
    draws = {tuple(pool.flatten().tolist()) for pool in pools}
    assert len(draws) > 1
    with pytest.raises(UserError, match="distractors"):
        ContinualCollator(references, distractors=-1)


def test_previous_share_makes_chunks_read_what_the_previous_chunks_retrieved():
    tokenizer = ByteTokenizer()
    references = knowledge(tokenizer)
    items = [
        {"tokens": torch.arange(9), "references": torch.tensor([r, (r + 1) % 4, -1, r])}
        for r in range(4) for _ in range(4)
    ]  # fmt: skip
    plain = ContinualCollator(references)(items)
    every = ContinualCollator(references, previous_share=1.0)(items)
    # the same pool; each chunk's slot is its predecessor's, chunk 0 reads none of its own
    assert torch.equal(every["pool"], plain["pool"])
    assert (every["slots"][:, 0] == -1).all()
    assert torch.equal(every["slots"][:, 1:], plain["slots"][:, :-1])
    half = ContinualCollator(references, previous_share=0.5, seed=3)(items)
    shifted = (half["slots"] != plain["slots"]).any(1)
    assert 0 < int(shifted.sum()) < len(items)
    assert torch.equal(half["slots"][shifted], every["slots"][shifted])
    assert torch.equal(
        half["slots"], ContinualCollator(references, previous_share=0.5, seed=3)(items)["slots"]
    )
    with pytest.raises(UserError, match="previous_share"):
        ContinualCollator(references, previous_share=1.5)


def test_epoch_sampler_resumes_mid_epoch_with_the_same_order():
    sampler = EpochSampler(10, shuffle=True, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2)
    sampler.start = 4
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies once
    sampler.set_epoch(3)
    assert sorted(sampler) == list(range(10)) and list(sampler) != full


def write_corpus(tmp_path, words=4000):
    lines = [f"{FACTS[i % 4]} Sentence number {i} of the corpus." for i in range(words // 8)]
    (tmp_path / "train.txt").write_text(" ".join(lines))
    (tmp_path / "kb.jsonl").write_text(
        "\n".join(json.dumps({"id": str(i), "text": t}) for i, t in enumerate(FACTS))
    )


def test_data_module_pairs_once_and_refuses_a_pairing_of_other_data(tmp_path):
    write_corpus(tmp_path)
    kwargs = dict(
        train=[FilesSource([tmp_path / "train.txt"])], seq_length=64, batch_size=2, chunk_length=32,
        knowledge=[FilesSource([tmp_path / "kb.jsonl"])], chunker=FixedChunker(128),
        embedder=HashedNgramEmbedder(dim=512), pairing_file=tmp_path / "pairing.pt",
    )  # fmt: skip
    data = TextDataModule(ByteTokenizer(), **kwargs)
    data.setup()
    assert (tmp_path / "pairing.pt").is_file()
    assert (data.train_set.pairing >= 0).float().mean() > 0.9
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].shape == (2, 65) and batch["slots"].shape == (2, 2)
    (tmp_path / "train.txt").write_text("Entirely different text. " * 200)
    with pytest.raises(UserError, match="pairs other data"):
        TextDataModule(ByteTokenizer(), **kwargs).setup()


def test_data_module_refuses_sequences_shorter_than_a_chunk(tmp_path):
    with pytest.raises(UserError, match="shorter than one chunk"):
        TextDataModule(ByteTokenizer(), [tmp_path], seq_length=32, chunk_length=64)


# ------------------------------------------------------------------- memories read from a bank
def bank_data(tiny_bank, **kwargs):
    """The continual data of `tiny_bank`'s world, reading memories from the bank."""
    from conftest import TINY_WORLD

    from m3.data.sources import WorldSource

    config = tiny_bank.recipe.model.config()
    options = dict(
        val=[WorldSource("heldout", **TINY_WORLD)], seq_length=128, batch_size=3,
        knowledge=[WorldSource("kb", **TINY_WORLD)], chunker=FixedChunker(config.reference_length),
        embedder=HashedNgramEmbedder(dim=512), chunk_length=config.chunk_length,
        memories=tiny_bank.folder,
    )  # fmt: skip
    return TextDataModule(ByteTokenizer(), [WorldSource("train", **TINY_WORLD)], **options | kwargs)


def bank_model(tiny_bank):
    from m3.model.checkpoints import load_weights
    from m3.model.memory3 import Memory3

    model = Memory3(tiny_bank.recipe.model.config())
    load_weights(model, tiny_bank.weights)
    return model


def test_store_batches_carry_what_the_bank_holds_for_their_references(tiny_bank):
    """Reference ids are the bank's ids; each worker opens the store itself."""
    import pickle

    from m3.bank.open import open_bank
    from m3.bank.table import ReferenceTable
    from m3.training.datamodule import open_memory_store

    data = bank_data(tiny_bank, num_workers=2)
    data.check_memories(bank_model(tiny_bank))
    data.setup()
    # the pairing read the bank's own reference table: nothing was cut again
    assert isinstance(data.references, ReferenceTable)
    assert data.references.folder == tiny_bank.folder / "references"
    bank = open_bank(tiny_bank.folder)
    # ids agree: the bank stored, under each id, the tokens of the pairing's reference
    assert len(bank.store) == len(data.references)
    for i, stored in enumerate(bank.store.references(range(len(data.references)))):
        assert list(stored.ids) == list(data.references[i].ids)
    encoding = ContinualCollator(data.references)
    size, pairing = data.batch_size, data.val_set.pairing
    batches = list(data.val_dataloader())  # in order, collated in worker processes
    assert len(batches) >= 2 and (pairing >= 0).any()
    for n, batch in enumerate(batches):
        items = [data.val_set[i] for i in range(n * size, min((n + 1) * size, len(data.val_set)))]
        assert "reference_tokens" not in batch
        layout = encoding(items)  # the same pool and slots as when encoding
        assert torch.equal(batch["pool"], layout["pool"])
        assert torch.equal(batch["slots"], layout["slots"])
        ids = torch.unique(pairing[n * size : (n + 1) * size])
        memory = bank.store.read(ids[ids >= 0])
        assert torch.equal(batch["memory_keys"], memory.keys)
        assert torch.equal(batch["memory_values"], memory.values)
        assert torch.equal(batch["memory_valid"], memory.valid)
        assert torch.equal(batch["memory_positions"], memory.positions)
    # a collator is pickled without its open store and opens it again where it is used
    collator = data.val_dataloader().collate_fn
    first = collator(items)
    assert collator._store is not None
    copy = pickle.loads(pickle.dumps(collator))
    assert copy._store is None
    assert torch.equal(copy(items)["memory_keys"], first["memory_keys"])
    # a batch whose chunks retrieved nothing gets one invalid dummy memory
    empty = copy([{"tokens": items[0]["tokens"], "references": torch.full_like(ids[:2], -1)}])
    assert empty["memory_keys"].shape[0] == 1 and not empty["memory_valid"].any()
    assert (empty["pool"] == -1).all()
    store, manifest = open_memory_store(tiny_bank.folder)
    assert manifest["references"] == len(store) == len(data.references)


def test_a_bank_that_does_not_fit_is_refused_naming_training_memories(tiny_bank, tmp_path):
    from conftest import TINY_WORLD

    from m3.data.sources import WorldSource

    model = bank_model(tiny_bank)
    with pytest.raises(UserError, match=r"training.memories: .* holds no finished memory bank"):
        bank_data(tiny_bank, memories=tmp_path).check_memories(model)
    fewer = [WorldSource("kb", n_people=8, n_places=6, n_orgs=6)]
    with pytest.raises(UserError, match=r"training.memories: .* holds \d+ references"):
        bank_data(tiny_bank, knowledge=fewer).check_memories(model)
    # as many references, other text (the same documents, case swapped): the stored tokens tell
    documents = WorldSource("kb", **TINY_WORLD).documents()
    lines = [json.dumps({"id": d.id, "text": d.text.swapcase()}) for d in documents]
    (tmp_path / "swapped.jsonl").write_text("\n".join(lines))
    data = bank_data(tiny_bank, knowledge=[FilesSource([tmp_path / "swapped.jsonl"])])
    data.references = data.build_references()
    assert len(data.references) == len(open_bank_store(tiny_bank))
    with pytest.raises(UserError, match=r"reference \d+ holds other tokens"):
        data.check_memories(model)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)  # other weights than the bank's writer
    with pytest.raises(UserError, match=r"training.memories: .* was written by weights"):
        bank_data(tiny_bank).check_memories(model)


def open_bank_store(tiny_bank):
    from m3.training.datamodule import open_memory_store

    return open_memory_store(tiny_bank.folder)[0]
