"""`m3 build-memory`: a tiny knowledge base through the real command, into tmp folders."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from m3.backends import ExactIndex, HDF5Store, StoreInfo
from m3.backends.cold_start import ColdStartStore
from m3.backends.sharded import ShardedStore
from m3.bank import vectors
from m3.bank.build import build_memory
from m3.bank.knowledge import read_knowledge
from m3.bank.open import open_bank
from m3.bank.vectors import EmbeddingShards
from m3.cli import main
from m3.core.errors import UserError
from m3.data.chunking import FixedChunker
from m3.data.sources import FilesSource
from m3.data.tokenizer import ByteTokenizer
from m3.memory.encoder import encode_references
from m3.model.memory3 import Memory3
from m3.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes/tiny/base.yaml")
BANK = str(ROOT / "recipes/tiny/build-memory.yaml")
SMALL = ["model.n_layer=2", "model.reference_length=32", "trainer.enable_progress_bar=false"]
FACTS = [
    "Ada Lovelace wrote the first program for the Analytical Engine in 1843.",
    "The river Sorrel flows north through the town of Quillfield into the lake.",
    "Marrow Industries makes copper wire and employs nine hundred people in Dunmore.",
    "Professor Ilse Varga studied the migration of cranes over the salt marshes.",
    "The Hollis bridge was closed in winter because ice cracked its stone pillars.",
    "Tobias Renn founded the Renn observatory on a hill above the harbour of Calde.",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small knowledge base (text files, a JSONL file, empty documents) and tiny weights."""
    root = tmp_path_factory.mktemp("bank")
    kb = root / "kb"
    kb.mkdir()
    for i, fact in enumerate(FACTS[:4]):
        (kb / f"fact{i}.txt").write_text(fact + " " + fact.upper())
    (kb / "blank.txt").write_text("  \n\t ")
    lines = [{"id": "j1", "text": FACTS[4]}, {"id": "j2", "text": "   "}, {"text": FACTS[5]}]
    (kb / "more.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = load_recipe([BASE, BANK], SMALL)
    torch.manual_seed(0)
    model = Memory3(recipe.model.config())
    torch.save(model.state_dict(), root / "model.pt")
    return {"root": root, "kb": kb, "weights": root / "model.pt"}


def args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        BASE, BANK, *SMALL, f"output={out}", f"training.init_weights={world['weights']}",
        f"data.knowledge=[{{class_path: files, init_args: {{paths: [{world['kb']}]}}}}]", *extra,
    ]  # fmt: skip


def recipe_of(world: dict[str, Path], out: Path, *extra: str):
    items = args(world, out, *extra)
    return load_recipe(items[:2], items[2:])


def expected(world: dict[str, Path]):
    """The references and their memories, computed directly with `encode_references`."""
    recipe = load_recipe([BASE, BANK], SMALL)
    config = recipe.model.config()
    model = Memory3(config)
    model.load_state_dict(torch.load(world["weights"]))
    tokenizer = ByteTokenizer()
    knowledge = read_knowledge(
        [FilesSource([world["kb"]])], tokenizer, chunker=FixedChunker(config.reference_length)
    )
    with torch.no_grad():
        memory = encode_references(
            model, [r.ids for r in knowledge.references], prefix=tokenizer.reference_prefix()
        )
    return model, tokenizer, knowledge, memory


def assert_same(got, want) -> None:
    torch.testing.assert_close(got.keys.float(), want.keys, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.values.float(), want.values, atol=1e-6, rtol=0)
    assert torch.equal(got.valid, want.valid)
    assert torch.equal(got.positions, want.positions)


@pytest.fixture(scope="module")
def built(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "bank"
    assert main(["build-memory", *args(world, out), "--batch-size", "8"]) == 0
    return out


def test_bank_holds_exactly_the_encoded_references(world, built):
    model, tokenizer, knowledge, memory = expected(world)
    count = len(knowledge.references)
    assert 24 <= count <= 80
    bank = open_bank(built)
    # one shard, read with the bank's reference table (m3.bank.open)
    assert isinstance(bank.store, ShardedStore) and bank.store.table is not None
    [shard] = bank.store.shards
    assert isinstance(shard, HDF5Store) and shard.complete
    assert shard.references(range(count)) == knowledge.references
    assert bank.store.ids().tolist() == list(range(count))
    assert_same(bank.store.read(torch.arange(count)), memory)
    assert bank.store.references(range(count)) == knowledge.references
    info = bank.store.info
    assert info.model_fingerprint == model.memory_fingerprint()
    assert info.tokenizer_fingerprint == tokenizer.fingerprint()
    assert list(info.reference_prefix) == tokenizer.reference_prefix()
    assert info.model_config == model.config.to_dict()
    assert bank.manifest["shards"] == [{"file": "store-rank0.h5", "references": count}]


def test_index_retrieves_each_reference_by_its_own_text(world, built):
    _, tokenizer, knowledge, _ = expected(world)
    bank = open_bank(built)
    assert isinstance(bank.index, ExactIndex) and len(bank.index) == len(knowledge.references)
    texts = [tokenizer.decode(r.ids) for r in knowledge.references]
    hits = bank.index.search(bank.embedder.embed(texts), 1).ids[:, 0]
    # identical texts may tie; every hit must be a reference with the same text
    assert all(texts[h] == t for h, t in zip(hits.tolist(), texts, strict=True))
    assert (hits == torch.arange(len(texts))).float().mean() > 0.9


def test_summary_counts_documents_references_skipped_and_bytes(world, built, capsys):
    _, _, knowledge, _ = expected(world)
    done = json.loads((built / "done.json").read_text())
    assert done["documents"] == 6 and done["skipped"] == 2
    assert done["references"] == done["encoded_this_run"] == len(knowledge.references)
    store_bytes = (built / "store-rank0.h5").stat().st_size
    assert done["bytes_written"] > done["store_bytes"] == store_bytes > 0
    assert main(["build-memory", *args(world, built)]) == 0
    assert "nothing to do" in capsys.readouterr().out


class Interrupt(L.Callback):
    """Fails the build after `after` batches were written."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def on_predict_batch_end(self, *args: object, **kwargs: object) -> None:
        self.seen += 1
        if self.seen == self.after:
            raise RuntimeError("simulated interruption")


def test_an_interrupted_build_resumes_where_it_stopped(world, tmp_path, capsys):
    _, _, knowledge, memory = expected(world)
    out = tmp_path / "bank"
    recipe = recipe_of(world, out)
    with pytest.raises(RuntimeError, match="simulated"):
        build_memory(recipe, batch_size=4, callbacks=[Interrupt(3)])
    shard = out / "store-rank0.h5"
    with pytest.raises(UserError, match="incomplete store"):
        HDF5Store(shard)
    partial = HDF5Store(shard, mode="r", allow_incomplete=True)
    assert len(partial) == 12 and not partial.complete
    partial.close()
    assert not (out / "done.json").exists()
    with pytest.raises(UserError, match="no finished memory bank"):
        open_bank(out)
    assert main(["build-memory", *args(world, out), "--batch-size", "4"]) == 0
    done = json.loads((out / "done.json").read_text())
    assert done["encoded_this_run"] == len(knowledge.references) - 12
    store = HDF5Store(shard)
    assert store.complete and store.ids().tolist() == list(range(len(knowledge.references)))
    assert_same(store.read(torch.arange(len(store))), memory)


def embeddings_of(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every reference's embedding in a bank's shards, and the ids, in id order."""
    parts = list(EmbeddingShards(folder / "embeddings").parts())
    return np.concatenate([v for v, _ in parts]), np.concatenate([i for _, i in parts])


def test_two_shards_open_as_one_store(world, built, tmp_path, capsys, monkeypatch):
    _, _, knowledge, memory = expected(world)
    out = tmp_path / "bank"
    recipe = recipe_of(world, out)
    monkeypatch.setattr(vectors, "REFERENCES_PER_SHARD", 8)  # both ranks embed shards
    build_memory(recipe, batch_size=8, shard=(1, 2))
    assert "shard 0 of 2 is not written yet" in capsys.readouterr().out
    assert not (out / "done.json").exists()
    shards = sorted(p.name for p in (out / "embeddings").glob("shard-*"))
    count = len(knowledge.references)
    assert shards == [f"shard-{n:05d}" for n in range(1, -(-count // 8), 2)]  # rank 1's own
    build_memory(recipe, batch_size=8, shard=(0, 2))
    bank = open_bank(out)
    count = len(knowledge.references)
    assert isinstance(bank.store, ShardedStore) and len(bank.store) == count
    assert [s["references"] for s in bank.manifest["shards"]] == [(count + 1) // 2, count // 2]
    order = torch.tensor([5, 0, 3, count - 1, 5])
    assert_same(bank.store.read(order), memory[order])
    assert bank.store.references([1, 2]) == knowledge.references[1:3]
    assert bank.store.verify() == []
    with pytest.raises(UserError, match="read-only"):
        bank.store.delete([0])
    # the same bank as one rank builds: reads, embedder, index and counts
    one = open_bank(built)
    ids = one.store.ids()
    assert torch.equal(bank.store.ids(), ids)
    reference = one.store.read(ids)
    reference = type(reference)(
        reference.keys.float(), reference.values.float(), reference.valid, reference.positions
    )
    assert_same(bank.store.read(ids), reference)
    assert bank.manifest["references"] == one.manifest["references"] == count
    assert bank.manifest["embedder"] == one.manifest["embedder"]
    queries = bank.embedder.embed([bytes(r.ids).decode() for r in one.store.references(ids)])
    # the same embeddings, by id, from shards of 8 written by two ranks as from one shard
    (got, got_ids), (want, want_ids) = embeddings_of(out), embeddings_of(built)
    assert np.array_equal(got_ids, np.arange(count)) and np.array_equal(want_ids, got_ids)
    assert np.array_equal(got, want) and got.shape == (count, bank.embedder.dim)
    assert bank.manifest["embeddings"]["shards"] == -(-count // 8)
    assert one.manifest["embeddings"]["shards"] == 1
    assert torch.equal(bank.index.ids().sort().values, one.index.ids().sort().values)
    found, expected_hits = bank.index.search(queries, 5), one.index.search(queries, 5)
    assert torch.equal(found.ids, expected_hits.ids)
    torch.testing.assert_close(found.scores, expected_hits.scores)
    one.store.close()
    # resuming with another number of ranks is refused
    (out / "done.json").unlink()
    with pytest.raises(UserError, match="more ranks than 1"):
        build_memory(recipe, batch_size=8)


def test_cold_start_encodes_on_first_read_then_serves_the_store(world, tmp_path):
    model, tokenizer, knowledge, memory = expected(world)
    config = model.config
    info = StoreInfo(
        memory_shape=config.memory_shape, dtype="float32",
        model_fingerprint=model.memory_fingerprint(),
    )  # fmt: skip
    store = HDF5Store(tmp_path / "lazy.h5", info=info, mode="w")
    lazy = ColdStartStore(
        store, model, knowledge.references, prefix=tokenizer.reference_prefix(), batch_size=2
    )
    assert len(lazy) == 0
    assert_same(lazy.read([3, 1, 3]), memory[torch.tensor([3, 1, 3])])
    assert lazy.encoded == 2 and lazy.ids().tolist() == [1, 3]
    assert_same(lazy.read([1, 4]), memory[torch.tensor([1, 4])])
    assert lazy.encoded == 3  # 1 came from the store
    assert lazy.references([4]) == [knowledge.references[4]]
    with pytest.raises(UserError, match="not in the knowledge base"):
        lazy.read([10_000])
    other = Memory3(config)
    with pytest.raises(UserError, match="rebuild the memory bank"):
        ColdStartStore(store, other, knowledge.references, prefix=tokenizer.reference_prefix())


def test_bad_inputs_stop_with_clear_errors(world, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   ")
    (empty / "b.jsonl").write_text(json.dumps({"text": "\n"}) + "\n")
    source = f"data.knowledge=[{{class_path: files, init_args: {{paths: [{empty}]}}}}]"
    out = tmp_path / "never"
    assert main(["build-memory", *args(world, out), source]) == 2
    err = capsys.readouterr().err
    assert "data.knowledge: the knowledge base is empty" in err and str(empty) in err
    assert "Traceback" not in err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    source = f"data.knowledge=[{{class_path: files, init_args: {{paths: [{bad}]}}}}]"
    assert main(["build-memory", *args(world, out), source]) == 2
    assert "bad.txt: not UTF-8" in capsys.readouterr().err
    missing = f"training.init_weights={tmp_path / 'none.pt'}"
    assert main(["build-memory", *args(world, out), missing]) == 2
    assert "training.init_weights:" in capsys.readouterr().err
    assert main(["build-memory", *args(world, out), "training.init_weights=null"]) == 2
    assert "training.init_weights: name the weights" in capsys.readouterr().err
    assert main(["build-memory", *args(world, out), "model.vocab_size=100"]) == 2
    assert "model.vocab_size is 100, but the tokenizer has 259 ids" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_another_recipe_is_refused_unless_overwrite(world, built, tmp_path, capsys):
    out = tmp_path / "bank"
    assert main(["build-memory", *args(world, out), "--batch-size", "16"]) == 0
    capsys.readouterr()
    changed = "data.seq_length=64"
    assert main(["build-memory", *args(world, out), changed]) == 2
    assert "holds the outputs of another recipe" in capsys.readouterr().err
    assert main(["build-memory", *args(world, out), "model.n_embd=32", "--overwrite"]) == 2
    assert "embed_tokens.weight has shape" in capsys.readouterr().err
    seed = "seed=1"  # another recipe, the same weights: replaced with --overwrite
    assert main(["build-memory", *args(world, out), seed, "--overwrite"]) == 0
    assert json.loads((out / "done.json").read_text())["references"] > 0


# ------------------------------------------------------------------------------ quantized banks
QUANTIZED = [
    "bank.quantizer={class_path: product, init_args: {subspaces: 4, bits: 4, iterations: 5}}",
    "bank.train_references=12",
]


def test_a_quantized_bank_round_trips_through_the_command(world, built, tmp_path, capsys):
    from m3.memory.quantize import MemoryQuantizer, relative_error

    _, _, knowledge, memory = expected(world)
    out = tmp_path / "bank"
    assert main(["build-memory", *args(world, out, *QUANTIZED), "--batch-size", "8"]) == 0
    bank = open_bank(out)
    [store] = bank.store.shards
    assert isinstance(store, HDF5Store) and store.complete and store.quantizer is not None
    assert bank.store.quantizer is store.quantizer
    saved = MemoryQuantizer.load(out / "quantizer.pt")
    fingerprint = saved.fingerprint()
    assert store.quantizer.fingerprint() == fingerprint
    assert bank.manifest["quantizer"]["fingerprint"] == fingerprint
    assert bank.manifest["quantizer"]["keys"]["code_bytes"] == 2  # 4 subspaces × 4 bits
    assert store.info.quantizer["fingerprint"] == fingerprint
    count = len(knowledge.references)
    got = store.read(torch.arange(count))
    assert got.keys.dtype == torch.float32 and got.keys.shape == memory.keys.shape
    assert torch.equal(got.valid, memory.valid) and torch.equal(got.positions, memory.positions)
    # what the bank serves is the quantizer's reconstruction of the true memories
    want = saved.decode(saved.encode(memory))
    same = (got.keys == want.keys).all(-1).float().mean()
    assert same > 0.99  # (a vector on a centroid boundary may flip between two batchings)
    for part in ("keys", "values"):
        true, read = getattr(memory, part).flatten(0, -2), getattr(got, part).flatten(0, -2)
        own = relative_error(true, getattr(want, part).flatten(0, -2))
        assert 0 < relative_error(true, read) == pytest.approx(own, rel=0.02)
    assert store.references(range(count)) == knowledge.references
    raw_bytes = json.loads((built / "done.json").read_text())["store_bytes"]
    assert json.loads((out / "done.json").read_text())["store_bytes"] < raw_bytes
    # m3 size reads the same settings: 2-byte codes, float32 numbers
    capsys.readouterr()
    assert main(["size", BASE, BANK, *SMALL, *QUANTIZED, "1000"]) == 0
    report = capsys.readouterr().out
    assert "2 B per key/value vector" in report and "4 B per number" in report
    # a saved quantizer builds another bank with the very same codes
    again = tmp_path / "again"
    from_file = f"bank.quantizer_file={out / 'quantizer.pt'}"
    assert main(["build-memory", *args(world, again, from_file), "--batch-size", "8"]) == 0
    other = open_bank(again)
    assert other.manifest["quantizer"]["fingerprint"] == fingerprint
    assert_same(other.store.read(torch.arange(count)), store.read(torch.arange(count)))


def test_an_interrupted_quantized_build_never_looks_complete(world, tmp_path, capsys):
    from m3.memory.quantize import MemoryQuantizer

    _, _, knowledge, _ = expected(world)
    out = tmp_path / "bank"
    recipe = recipe_of(world, out, *QUANTIZED)
    with pytest.raises(RuntimeError, match="simulated"):
        build_memory(recipe, batch_size=4, callbacks=[Interrupt(2)])
    shard = out / "store-rank0.h5"
    with pytest.raises(UserError, match="incomplete store"):
        HDF5Store(shard)
    partial = HDF5Store(shard, mode="r", allow_incomplete=True)
    assert len(partial) == 8 and not partial.complete and partial.quantizer is not None
    trained = partial.quantizer.fingerprint()
    partial.close()
    assert not (out / "done.json").exists() and not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="no finished memory bank"):
        open_bank(out)
    assert MemoryQuantizer.load(out / "quantizer.pt").fingerprint() == trained
    # the resumed build reuses the saved quantizer: one set of codes in the whole shard
    assert main(["build-memory", *args(world, out, *QUANTIZED), "--batch-size", "4"]) == 0
    bank = open_bank(out)
    assert bank.manifest["quantizer"]["fingerprint"] == trained
    assert bank.store.ids().tolist() == list(range(len(knowledge.references)))
    assert bank.store.verify() == []


def test_bank_settings_are_checked_before_any_work(world, tmp_path, capsys):
    out = tmp_path / "never"
    bad = "bank.quantizer={class_path: product, init_args: {subspaces: 3}}"
    assert main(["build-memory", *args(world, out, bad)]) == 2
    assert "bank.quantizer.init_args: rejected: ProductQuantizer: dim 16" in capsys.readouterr().err
    too_few = [QUANTIZED[0].replace("bits: 4", "bits: 12"), "bank.train_references=1"]
    assert main(["build-memory", *args(world, out, *too_few)]) == 2
    err = capsys.readouterr().err
    assert "bank.quantizer: cannot train it" in err and "bank.train_references" in err
    assert not (out / "done.json").exists()
