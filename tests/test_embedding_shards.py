"""Per-rank embedding: shards of vectors, resumed after a kill, checked by `m3 verify`, and
the indexes built from them (`ExactIndex`/`ScannIndex` memory-mapped, `MilvusIndex` shard by
shard, with the embedder's fingerprint on its collection)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bank_trust import adopt, args, assert_same_bank, contents, make_weights, write_kb

from m3.backends import milvus_client
from m3.backends.exact_index import ExactIndex
from m3.backends.scann_index import ScannIndex
from m3.bank import vectors
from m3.bank.open import open_bank
from m3.bank.vectors import EmbeddingShards
from m3.cli import main
from m3.core.errors import UserError
from m3.retrieval.embedders import HashedNgramEmbedder

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    write_kb(root / "kb.jsonl", 40)
    make_weights(root / "model.pt")
    return {"root": root, "kb": root / "kb.jsonl", "weights": root / "model.pt"}


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors, "REFERENCES_PER_SHARD", PER_SHARD)


@pytest.fixture(scope="module")
def bank(inputs, tmp_path_factory) -> Path:
    """A bank built in one go, in embedding shards of 16 references."""
    out = tmp_path_factory.mktemp("built") / "bank"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vectors, "REFERENCES_PER_SHARD", PER_SHARD)
        assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out)]) == 0
    return out


def embeddings(folder: Path) -> np.ndarray:
    return np.concatenate([v for v, _ in EmbeddingShards(folder / "embeddings").parts()])


def copy_of(bank: Path, tmp_path: Path, inputs) -> Path:
    out = tmp_path / "bank"
    shutil.copytree(bank, out)
    adopt(out, inputs)
    return out


def test_the_shards_hold_the_embedder_fitted_on_all_references_at_once(bank) -> None:
    opened = open_bank(bank)
    texts = [bytes(r.ids).decode() for r in opened.store.references(opened.store.ids())]
    opened.store.close()
    whole = HashedNgramEmbedder(dim=4096, ngrams=[1])
    whole.fit(texts)  # the fit of today's build_index, on every text at once
    assert torch.equal(opened.embedder.idf, whole.idf)
    assert opened.embedder.fingerprint() == whole.fingerprint()
    assert np.array_equal(embeddings(bank), whole.embed(texts).numpy())
    shards = EmbeddingShards(bank / "embeddings")
    assert len(shards.shards) == -(-len(texts) // PER_SHARD) > 3
    assert shards.manifest["embedder"] == opened.manifest["embedder"]["fingerprint"]
    assert shards.problems(checksums=True) == {}
    assert len(list((bank / "embeddings").glob("fit-*.npz"))) == len(shards.shards)


KILLED_BUILD = """
import sys, time
import lightning as L
from m3.bank import embeddings, vectors
vectors.REFERENCES_PER_SHARD = {per_shard}
embeddings.EMBEDDING_BATCH = 4  # four batches a shard: a kill can land inside one
from m3.bank.build import build_memory
from m3.recipes import load_recipe

class Slow(L.Callback):
    def on_predict_batch_end(self, trainer, module, *rest, **named):
        if isinstance(module, embeddings.EmbeddingModule):
            time.sleep(0.15)

items = {items!r}
build_memory(load_recipe(items[:2], items[2:]), callbacks=[Slow()])
"""


def test_a_build_killed_mid_embedding_resumes_to_the_same_bank(
    inputs, bank, tmp_path, small_shards
) -> None:
    out = tmp_path / "killed"
    code = KILLED_BUILD.format(per_shard=PER_SHARD, items=args(inputs["kb"], inputs["weights"],
                                                               out))  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    while process.poll() is None and not (out / "embeddings" / "shard-00002").is_dir():
        time.sleep(0.01)
    time.sleep(0.3)  # two batches into shard 3
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = sorted(p.name for p in (out / "embeddings").iterdir() if p.name.startswith("shard"))
    assert any(name.endswith(".tmp") for name in left), left  # a shard half written
    assert not (out / "done.json").exists()
    total = len(EmbeddingShards(bank / "embeddings"))
    assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out)]) == 0
    done = json.loads((out / "done.json").read_text())
    assert done["encoded_this_run"] == 0 and 0 < done["embedded_this_run"] < total
    assert not list((out / "embeddings").glob("*.tmp"))
    assert_same_bank(contents(out), contents(bank))
    assert np.array_equal(embeddings(out), embeddings(bank))
    assert main(["verify", str(out)]) == 0


def test_an_embedding_shard_gone_is_embedded_again_alone(
    inputs, bank, tmp_path, small_shards, capsys
) -> None:
    out = copy_of(bank, tmp_path, inputs)
    shutil.rmtree(out / "embeddings" / "shard-00001")
    capsys.readouterr()
    assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out)]) == 0
    said = capsys.readouterr()
    assert "embeddings/shard-00001 is missing" in said.err and "resuming" in said.err
    done = json.loads((out / "done.json").read_text())
    assert (done["encoded_this_run"], done["embedded_this_run"]) == (0, PER_SHARD)
    assert_same_bank(contents(out), contents(bank))
    assert np.array_equal(embeddings(out), embeddings(bank))


def test_verify_names_a_missing_or_damaged_embedding_shard_and_repair_restores_it(
    inputs, bank, tmp_path, small_shards, capsys
) -> None:
    out = copy_of(bank, tmp_path, inputs)
    shutil.rmtree(out / "embeddings" / "shard-00001")
    path = out / "embeddings" / "shard-00002" / "vectors.npy"
    with path.open("r+b") as f:  # a flipped byte in the vectors, past the header
        f.seek(path.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    said = capsys.readouterr().out
    assert "embeddings/shard-00001 is missing" in said
    assert "embeddings/shard-00002 is damaged (its bytes fail their crc32)" in said
    assert main(["verify", str(out), "--repair"]) == 0
    assert "all checks hold" in capsys.readouterr().out
    assert json.loads((out / "done.json").read_text())["embedded_this_run"] == 2 * PER_SHARD
    assert np.array_equal(embeddings(out), embeddings(bank))
    assert_same_bank(contents(out), contents(bank))


def test_verify_names_embedding_shards_of_another_embedder(inputs, bank, tmp_path, capsys):
    out = copy_of(bank, tmp_path, inputs)
    manifest = json.loads((out / "embeddings" / "manifest.json").read_text())
    manifest["embedder"] = "0" * 64
    (out / "embeddings" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(out)]) == 1
    assert "embeddings/ holds the vectors of another embedder" in capsys.readouterr().out


# ------------------------------------------------------------------ Milvus: the embedder's stamp
@pytest.fixture
def milvus_uri(tmp_path: Path):
    yield str(tmp_path / "milvus.db")
    gc.collect()
    assert not milvus_client.CLIENTS, "a MilvusIndex is still connected"


def test_a_milvus_collection_of_another_embedder_is_named(
    inputs, tmp_path, milvus_uri, small_shards, capsys
) -> None:
    index = (f"bank.index={{class_path: milvus, init_args: {{uri: {milvus_uri}, "
             "index_type: FLAT}}")  # fmt: skip
    banks = {}
    for name, ngrams in (("a", "[1]"), ("b", "[1, 2]")):  # two embedders of the same dim
        out = tmp_path / name
        extra = (index, f"embedder.init_args.ngrams={ngrams}")
        assert main(["build-memory", *args(inputs["kb"], inputs["weights"], out, *extra)]) == 0
        banks[name] = out
    saved = {n: json.loads((b / "index" / "index.json").read_text()) for n, b in banks.items()}
    for name, out in banks.items():  # the collection records the bank's fitted embedder
        fingerprint = json.loads((out / "manifest.json").read_text())["embedder"]["fingerprint"]
        assert saved[name]["stamp"]["embedder_fingerprint"] == fingerprint
    opened = open_bank(banks["a"])
    assert len(opened.index) == len(EmbeddingShards(banks["a"] / "embeddings"))
    opened.index.close()
    opened.store.close()
    # bank a's index folder pointed at bank b's collection
    theirs = {**saved["a"], "collection_name": saved["b"]["collection_name"]}
    (banks["a"] / "index" / "index.json").write_text(json.dumps(theirs))
    with pytest.raises(UserError, match=r"holds embedder fingerprint '.*', the index folder"):
        open_bank(banks["a"])
    capsys.readouterr()
    assert main(["verify", str(banks["a"])]) == 1
    assert "embedder fingerprint" in capsys.readouterr().out
    # the whole folder of bank b copied over: it loads, and verify names the embedder
    (banks["a"] / "index" / "index.json").write_text(json.dumps(saved["b"]))
    assert main(["verify", str(banks["a"])]) == 1
    out = capsys.readouterr().out
    assert "index/ holds the vectors of another embedder" in out
    gc.collect()


# ------------------------------------------------------------------ indexes from shards
def parts(vectors: torch.Tensor, size: int):
    for start in range(0, len(vectors), size):
        block = vectors[start : start + size].numpy()
        yield block, np.arange(start, start + len(block)) * 3 + 1


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether a tensor's memory is a mapping of the file (Linux's /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_exact_index_from_parts_is_the_index_of_add(metric, tmp_path) -> None:
    vectors = torch.randn(500, 24, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(500) * 3 + 1
    added = ExactIndex(24, metric=metric)
    added.add(vectors, ids)
    streamed = ExactIndex(24, metric=metric)
    streamed.add_parts(parts(vectors, 64), 500, tmp_path / "index")
    assert mapped_from(streamed._rows.data, tmp_path / "index" / "vectors.npy")  # not read
    queries = torch.randn(30, 24, generator=torch.Generator().manual_seed(1))
    got, want = streamed.search(queries, 7), added.search(queries, 7)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    loaded = ExactIndex.load(tmp_path / "index")  # add_parts saved it
    assert torch.equal(loaded.search(queries, 7).ids, want.ids)
    # a change stays in the process; saving replaces the files under a reader that maps them
    loaded.remove(ids[:10])
    assert len(ExactIndex.load(tmp_path / "index")) == 500
    loaded.save(tmp_path / "index")
    assert torch.equal(streamed.search(queries, 7).ids, want.ids)
    assert len(ExactIndex.load(tmp_path / "index")) == 490
    with pytest.raises(UserError, match="holds vectors already"):
        streamed.add_parts(parts(vectors, 64), 500, tmp_path / "again")
    with pytest.raises(UserError, match="hold 500 vectors, expected 501"):
        ExactIndex(24).add_parts(parts(vectors, 64), 501, tmp_path / "short")
    assert not list((tmp_path / "short").glob("*.npy*"))


def test_scann_index_from_parts_is_the_index_of_add_and_build(tmp_path) -> None:
    settings = {"num_leaves": 20, "num_leaves_to_search": 8, "reorder_num_neighbors": 50,
                "brute_force_below": 0}  # fmt: skip
    vectors = torch.randn(2000, 16, generator=torch.Generator().manual_seed(2))
    added = ScannIndex(16, **settings)
    added.add(vectors, torch.arange(2000) * 3 + 1)
    added.build()
    streamed = ScannIndex(16, **settings)
    streamed.add_parts(parts(vectors, 300), 2000, tmp_path)
    assert not list(tmp_path.iterdir())  # the scratch file is gone
    queries = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    got, want = streamed.search(queries, 5), added.search(queries, 5)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.scores, want.scores)
    assert streamed.build_params == added.build_params
