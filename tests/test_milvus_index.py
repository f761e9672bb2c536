"""What is specific to `MilvusIndex` (the shared contract runs in `test_indexes_contract.py`):
copy on write across edits, discarding folders, bad connections and collections, recipes."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from m3.backends import milvus_client
from m3.backends.base import MemoryIndex
from m3.backends.exact_index import ExactIndex
from m3.backends.milvus_index import RETIRED, MilvusIndex
from m3.cli import main
from m3.core import registry
from m3.core.errors import UserError
from m3.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def uri(tmp_path: Path) -> Iterator[str]:
    """A milvus-lite file; every handle of the test must be closed or collected by its end."""
    yield str(tmp_path / "bank" / "milvus.db")
    gc.collect()
    assert not milvus_client.CLIENTS, "a MilvusIndex is still connected"


def _vectors(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.arange(n) * 2 + 5


def _built(uri: str, **kwargs: object) -> MilvusIndex:
    vectors, ids = _vectors()
    index = MilvusIndex(16, uri=uri, **kwargs)  # type: ignore[arg-type]
    index.add(vectors, ids)
    index.build()
    return index


def test_an_edit_saved_to_a_new_folder_leaves_readers_of_the_old_one_alone(
    uri: str, tmp_path: Path
) -> None:
    vectors, ids = _vectors()
    built = _built(uri)
    built.save(tmp_path / "bank" / "index")
    built.close()
    editor = MilvusIndex.load(tmp_path / "bank" / "index")  # what m3 edit does
    reader = MilvusIndex.load(tmp_path / "bank" / "index")  # a reader opened before it
    before = reader.search(vectors[:20], 5)
    editor.remove(ids[:10])
    editor.add(-vectors[10:20], ids[10:20])  # rewritten
    editor.add(vectors[:10] + 0.01, torch.arange(10) + 10_000)  # new references
    editor.build()
    editor.save(tmp_path / "bank" / "index-0001")
    # the reader searches the old knowledge base, whole
    after = reader.search(vectors[:20], 5)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
    assert len(reader) == 300 and reader._collection != editor._collection
    # a reader that opens the new folder searches the new one, whole
    new = MilvusIndex.load(tmp_path / "bank" / "index-0001")
    assert len(new) == 300
    assert new.search(vectors[:10] + 0.01, 1).ids[:, 0].tolist() == list(range(10_000, 10_010))
    assert new.search(-vectors[10:20], 1).ids[:, 0].tolist() == ids[10:20].tolist()
    assert not bool(torch.isin(new.search(vectors[:20], 5).ids, ids[:10]).any())
    # and the old folder still loads as it was saved
    old = MilvusIndex.load(tmp_path / "bank" / "index")
    assert torch.equal(old.search(vectors[:20], 5).ids, before.ids)
    for handle in (editor, reader, new, old):
        handle.close()


def test_each_saved_folder_names_its_own_collection(uri: str, tmp_path: Path) -> None:
    index = _built(uri)
    index.save(tmp_path / "a")
    index.save(tmp_path / "a")  # again to the same folder: the same collection
    first = json.loads((tmp_path / "a" / "index.json").read_text())["collection_name"]
    index.save(tmp_path / "b")  # another folder, no change: a copy all the same
    second = json.loads((tmp_path / "b" / "index.json").read_text())["collection_name"]
    assert first != second and len(MilvusIndex.load(tmp_path / "b")) == 300
    manifest = json.loads((tmp_path / "a" / "index.json").read_text())
    assert manifest["config"]["uri"] == "../bank/milvus.db"  # relative to the folder
    index.close()


def test_discard_retires_then_drops_old_collections(uri: str, tmp_path: Path) -> None:
    index = _built(uri, retire_after=0.0)
    index.save(tmp_path / "index")
    index.remove(torch.tensor([5]))
    index.save(tmp_path / "index-0001")
    reader = MilvusIndex.load(tmp_path / "index")
    MilvusIndex.discard(tmp_path / "index")  # the bank's garbage collection after an edit
    assert not (tmp_path / "index").exists()
    client = milvus_client.CLIENTS[reader.uri][0]
    assert RETIRED in client.describe_collection(reader._collection)["properties"]
    assert reader.search(torch.randn(1, 16), 1).ids.shape == (1, 1)  # still searchable
    index.add(torch.randn(1, 16), torch.tensor([5]))
    index.save(tmp_path / "index-0002")
    MilvusIndex.discard(tmp_path / "index-0001")  # drops the collection retired before
    with pytest.raises(UserError, match="gone"):
        reader.search(torch.randn(1, 16), 1)
    assert len(MilvusIndex.load(tmp_path / "index-0002")) == 300
    MilvusIndex.discard(tmp_path / "no-such-folder")  # nothing there: no error
    for handle in (index, reader):
        handle.close()


def test_other_indexes_discard_by_deleting_the_folder(tmp_path: Path) -> None:
    index = ExactIndex(4)
    index.add(torch.randn(2, 4), torch.arange(2))
    index.save(tmp_path / "index")
    MemoryIndex.discard(tmp_path / "index")
    ExactIndex.discard(tmp_path / "index")  # already gone: no error
    assert not (tmp_path / "index").exists()


def test_close_drops_a_collection_nothing_names(uri: str, tmp_path: Path) -> None:
    index = _built(uri)
    name = index._collection
    index.close()
    saved = _built(uri)
    saved.save(tmp_path / "index")
    client = milvus_client.connect(uri, lite=True, timeout=10, token="")
    assert name not in client.list_collections() and saved._collection in client.list_collections()
    milvus_client.disconnect(uri, lite=True)
    saved.close()


def test_a_collection_that_is_not_the_saved_one_is_named(uri: str, tmp_path: Path) -> None:
    index = _built(uri, embedder_fingerprint="aaaa")
    index.save(tmp_path / "index")
    other = _built(uri, embedder_fingerprint="bbbb")
    other.save(tmp_path / "other")
    manifest_path = tmp_path / "index" / "index.json"
    manifest = json.loads(manifest_path.read_text())
    theirs = json.loads((tmp_path / "other" / "index.json").read_text())
    manifest["collection_name"] = theirs["collection_name"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"embedder fingerprint 'bbbb'.*expects 'aaaa'"):
        MilvusIndex.load(tmp_path / "index")
    manifest["stamp"] = {**theirs["stamp"], "dim": 32}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="dimension 16, the index folder expects 32"):
        MilvusIndex.load(tmp_path / "index")
    manifest["stamp"], manifest["fingerprint"] = theirs["stamp"], theirs["fingerprint"]
    manifest_path.write_text(json.dumps(manifest))
    other.remove(torch.tensor([5, 7]))  # not theirs any more: a copy, theirs keeps 300
    assert len(MilvusIndex.load(tmp_path / "index")) == 300
    manifest["collection_name"] = "m3_index_0000000000000000"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="m3_index_0000000000000000 is not on"):
        MilvusIndex.load(tmp_path / "index")
    for handle in (index, other):
        handle.close()


def test_a_server_that_does_not_answer_is_named_quickly() -> None:
    index = MilvusIndex(8, uri="http://127.0.0.1:9", timeout=2)  # nothing listens on port 9
    start = time.monotonic()
    with pytest.raises(UserError, match=r"no Milvus server answers at http://127\.0\.0\.1:9"):
        index.add(torch.randn(2, 8), torch.arange(2))
    assert time.monotonic() - start < 10
    assert not milvus_client.CLIENTS


def test_a_lite_file_open_in_another_process_is_a_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "milvus.db"
    folder.mkdir()
    fd = os.open(folder / "LOCK", os.O_RDWR | os.O_CREAT)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # another process holds milvus-lite's lock, as its server does
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(write, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.read(read, 1)
        with pytest.raises(UserError, match="open in another process"):
            MilvusIndex(8, uri=str(folder)).add(torch.randn(1, 8), torch.arange(1))
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        for n in (fd, read, write):
            os.close(n)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index_type": "IVF_SQ"}, r"index_type must be one of \['FLAT', 'IVF_FLAT'"),
        ({"index_type": "HNSW"}, "HNSW needs a Milvus server"),
        ({"index_type": "IVF_FLAT", "index_params": {"M": 8}}, r"take \['nlist'\], got \['M'\]"),
        ({"search_params": {"nprobe": 8}}, "search_params of FLAT take nothing"),
        ({"uri": "bank/milvus"}, "ending in .db"),
        ({"uri": "http://user:secret@host:19530"}, "no credentials"),
        ({"metric": "l2"}, "metric"),
        ({"collection": "9lives"}, "collection must be a name"),
    ],
)
def test_bad_settings_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        MilvusIndex(8, **{"uri": "x.db", **kwargs})


def test_server_index_types_are_allowed_with_a_server_uri() -> None:
    index = MilvusIndex(
        8,
        uri="http://milvus:19530",
        index_type="HNSW",
        index_params={"M": 16, "efConstruction": 200},
        search_params={"ef": 64},
    )
    assert index.lite is False and index.uri == "http://milvus:19530"


def test_missing_pymilvus_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install memory3-lm\[milvus\]"):
        MilvusIndex(8, uri="x.db")


def test_the_overlay_names_a_milvus_index(tmp_path: Path) -> None:
    recipe = load_recipe([ROOT / "recipes/tiny/base.yaml", ROOT / "recipes/tiny/build-memory.yaml",
                          ROOT / "recipes/overlays/milvus.yaml"])  # fmt: skip
    index = registry.instantiate("index", recipe.bank.index, dim=4096)
    assert isinstance(index, MilvusIndex) and index.index_type == "IVF_FLAT"
    assert index.uri == os.path.abspath("runs/tiny/bank/milvus.db")


def test_a_bad_index_in_a_recipe_exits_2_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipes = [str(ROOT / f"recipes/{name}.yaml")
               for name in ("tiny/base", "tiny/build-memory", "overlays/milvus")]  # fmt: skip
    assert main(["check", "-q", *recipes, "bank.index.init_args.index_type=DISK"]) == 2
    err = capsys.readouterr().err
    assert "bank.index.init_args" in err and "DISKANN" in err and "Traceback" not in err
