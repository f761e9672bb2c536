"""One contract suite for every `MemoryIndex`, then what is specific to `ScannIndex`.

`MilvusIndex` runs the suite on milvus-lite (one file for the module); its own tests are in
`tests/test_milvus_index.py`.

Every case below runs every `test_contract_*` test. To run the suite on your own subclass,
put a module like this next to this file (or copy the file) and override the `case`
fixture; `__all__` limits the star import to the contract itself:

```python
import pytest
from test_indexes_contract import *  # noqa: F403

@pytest.fixture(params=[IndexCase("mine", lambda dim, metric: MyIndex(dim, metric=metric),
                                  exact=False)], ids=lambda case: case.name)
def case(request):
    return request.param

recall_case = case   # also measure its recall@5 against ExactIndex on clustered data
```
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from m3.backends import milvus_client
from m3.backends.base import MemoryIndex
from m3.backends.exact_index import ExactIndex
from m3.backends.milvus_index import MilvusIndex
from m3.backends.scann_index import ScannIndex, native_stderr_to_log
from m3.core.errors import UserError

__all__ = [
    "IndexCase",
    "case",
    "clustered",
    "metric",
    "milvus_handles_are_closed",
    "milvus_lite_server",
    "recall_case",
    "test_contract_bad_input_is_a_user_error",
    "test_contract_empty_index_has_no_hits",
    "test_contract_finds_stored_vectors_themselves",
    "test_contract_k_as_large_as_the_index",
    "test_contract_k_beyond_size_gives_minus_one",
    "test_contract_length",
    "test_contract_pickle_round_trip",
    "test_contract_readd_replaces",
    "test_contract_recall_at_5_against_exact",
    "test_contract_remove_never_returns_removed_ids",
    "test_contract_save_load_same_results",
    "test_contract_scores_are_the_metric_of_the_returned_ids",
]


@dataclass(frozen=True)
class IndexCase:
    """An index under test: a factory of empty indexes, whether its search is exact, and the
    recall@5 it must reach against `ExactIndex` on clustered data."""

    name: str
    make: Callable[[int, str], MemoryIndex]  # (dim, metric) -> empty index
    exact: bool
    min_recall: float = 0.9


def _scann_tree(dim: int, metric: str) -> ScannIndex:
    # Small enough for 2,000 vectors, but a real tree + AH + reorder (no brute-force fallback).
    return ScannIndex(dim, metric=metric, num_leaves=20, num_leaves_to_search=8,
                      reorder_num_neighbors=50, brute_force_below=0)  # fmt: skip


_MILVUS_DIR = tempfile.TemporaryDirectory(prefix="m3-milvus-contract-")
_MILVUS_OPEN: list[MilvusIndex] = []


def _milvus(index_type: str, **kwargs: object) -> Callable[[int, str], MilvusIndex]:
    def make(dim: int, metric: str) -> MilvusIndex:
        index = MilvusIndex(dim, metric=metric, uri=f"{_MILVUS_DIR.name}/contract.db",
                            index_type=index_type, **kwargs)  # type: ignore[arg-type]  # fmt: skip
        _MILVUS_OPEN.append(index)
        return index

    return make


CASES = [
    IndexCase("exact", lambda dim, metric: ExactIndex(dim, metric=metric), exact=True),
    # 64-byte blocks: one query per block, so the blocking over queries is exercised.
    IndexCase("exact-blocked", lambda d, m: ExactIndex(d, metric=m, block_bytes=64), exact=True),
    IndexCase("scann-brute-force", lambda d, m: ScannIndex(d, metric=m), exact=True),
    IndexCase("scann-tree-ah", _scann_tree, exact=False),
    IndexCase("milvus-lite-flat", _milvus("FLAT"), exact=True),
    # 32 lists of ~60 vectors, 8 searched: IVF really prunes, and k=20 still finds 20.
    IndexCase(
        "milvus-lite-ivf-flat",
        _milvus("IVF_FLAT", index_params={"nlist": 32}, search_params={"nprobe": 8}),
        exact=False,
    ),
]

RECALL_CASES = [
    IndexCase(
        "scann-tree-ah-100-leaves",
        lambda d, m: ScannIndex(
            d,
            metric=m,
            num_leaves=100,
            num_leaves_to_search=10,
            reorder_num_neighbors=100,
            brute_force_below=0,
        ),
        exact=False,
    ),
    IndexCase("milvus-lite-flat", _milvus("FLAT"), exact=True, min_recall=1.0),
    IndexCase(
        "milvus-lite-ivf-flat-200-lists",
        _milvus("IVF_FLAT", index_params={"nlist": 200}, search_params={"nprobe": 20}),
        exact=False,
        min_recall=0.99,
    ),
]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request: pytest.FixtureRequest) -> IndexCase:
    return request.param


@pytest.fixture(params=RECALL_CASES, ids=lambda case: case.name)
def recall_case(request: pytest.FixtureRequest) -> IndexCase:
    return request.param


@pytest.fixture(scope="module", autouse=True)
def milvus_lite_server() -> Iterator[str]:
    """One connection to the module's milvus-lite file, held throughout, so that its server
    starts once; when the module is done nothing stays connected."""
    uri = f"{_MILVUS_DIR.name}/contract.db"
    milvus_client.connect(uri, lite=True, timeout=10.0, token="")
    yield uri
    milvus_client.disconnect(uri, lite=True)
    assert not milvus_client.CLIENTS, "a MilvusIndex is still connected"


@pytest.fixture(autouse=True)
def milvus_handles_are_closed(milvus_lite_server: str) -> Iterator[None]:
    """Close the Milvus indexes a test made; none but the module's stays connected."""
    yield
    while _MILVUS_OPEN:
        _MILVUS_OPEN.pop().close()
    gc.collect()  # loaded and unpickled handles let go when they are collected
    handles = milvus_client.CLIENTS[milvus_lite_server][1]
    assert handles == 1, f"{handles - 1} MilvusIndex handles are still connected"


@pytest.fixture(params=["cosine", "dot"])
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


def clustered(n: int, dim: int, *, clusters: int, noise: float, seed: int) -> torch.Tensor:
    """`(n, dim)` vectors around `clusters` Gaussian centres (recall needs structure)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g)


def _data(n: int = 2000, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    vectors = clustered(n, dim, clusters=20, noise=0.3, seed=seed)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) * 3 + 7  # not rows
    return vectors, ids


def _built(case: IndexCase, metric: str, vectors: torch.Tensor, ids: torch.Tensor) -> MemoryIndex:
    index = case.make(vectors.shape[1], metric)
    index.add(vectors, ids)
    index.build()
    return index


def _true_scores(metric: str, queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    q, v = queries.double(), vectors.double()
    if metric == "cosine":
        q, v = q / q.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    return q @ v.T


def test_contract_finds_stored_vectors_themselves(case: IndexCase) -> None:
    vectors, ids = _data()
    index = _built(case, "cosine", vectors, ids)
    result = index.search(vectors[:500], 5)
    assert result.ids.dtype == torch.int64 and result.scores.dtype == torch.float32
    assert result.ids.shape == result.scores.shape == (500, 5)
    hit = result.ids[:, 0] == ids[:500]
    assert hit.float().mean() >= (1.0 if case.exact else 0.95)
    assert torch.allclose(result.scores[hit, 0], torch.ones(int(hit.sum())), atol=1e-4)


def test_contract_scores_are_the_metric_of_the_returned_ids(case: IndexCase, metric: str) -> None:
    vectors, ids = _data()
    index = _built(case, metric, vectors, ids)
    queries = clustered(64, 32, clusters=20, noise=0.3, seed=0) + 0.1  # same centres, new points
    result = index.search(queries, 10)
    truth = _true_scores(metric, queries, vectors)
    row_of = {int(i): r for r, i in enumerate(ids)}
    rows = torch.tensor([[row_of[int(i)] for i in line] for line in result.ids])
    recomputed = truth.gather(1, rows).float()
    assert torch.allclose(result.scores, recomputed, rtol=1e-4, atol=1e-4)
    assert bool((result.scores[:, :-1] >= result.scores[:, 1:]).all()), "best first"
    if case.exact:
        assert torch.allclose(result.scores, truth.topk(10, dim=1).values.float(), atol=1e-4)


def test_contract_k_beyond_size_gives_minus_one(case: IndexCase, metric: str) -> None:
    vectors, ids = _data(n=7)
    index = _built(case, metric, vectors, ids)
    result = index.search(vectors[:3], 10)
    assert result.ids.shape == (3, 10) and result.ids.dtype == torch.int64
    assert bool((result.ids[:, 7:] == -1).all())
    assert bool(torch.isneginf(result.scores[:, 7:]).all())
    for line in result.ids[:, :7]:
        assert sorted(line.tolist()) == sorted(ids.tolist())


def test_contract_k_as_large_as_the_index(case: IndexCase) -> None:
    vectors, ids = _data()
    index = _built(case, "cosine", vectors, ids)
    result = index.search(vectors[:4], 2000)
    for line_ids, line_scores in zip(result.ids, result.scores, strict=True):
        found = line_ids >= 0
        hits = int(found.sum())
        assert bool(found[:hits].all()), "hits come first, then −1"
        assert torch.isin(line_ids[:hits], ids).all() and line_ids[:hits].unique().numel() == hits
        assert bool(torch.isfinite(line_scores[:hits]).all())
        assert bool(torch.isneginf(line_scores[hits:]).all())
        if case.exact:
            assert hits == 2000


def test_contract_empty_index_has_no_hits(case: IndexCase) -> None:
    index = case.make(16, "cosine")
    index.build()
    result = index.search(torch.randn(2, 16), 3)
    assert result.ids.tolist() == [[-1] * 3] * 2
    assert bool(torch.isneginf(result.scores).all())


def test_contract_remove_never_returns_removed_ids(case: IndexCase, metric: str) -> None:
    vectors, ids = _data()
    index = _built(case, metric, vectors, ids)
    gone = ids[::4]
    index.remove(gone)
    index.build()
    assert len(index) == 2000 - len(gone)
    result = index.search(vectors[::4], 20)  # the removed vectors themselves as queries
    assert not bool(torch.isin(result.ids, gone).any())
    assert bool((result.ids >= 0).all())
    kept = torch.ones(2000, dtype=torch.bool)
    kept[::4] = False
    if metric == "cosine":  # the vectors that stay are still found under their own ids
        hit = index.search(vectors[kept], 1).ids[:, 0] == ids[kept]
        assert hit.float().mean() >= (1.0 if case.exact else 0.95)
    with pytest.raises(KeyError):
        index.remove(gone[:1])


def test_contract_readd_replaces(case: IndexCase) -> None:
    vectors, ids = _data()
    index = _built(case, "cosine", vectors, ids)
    moved = vectors[1:2] * -1  # away from every cluster it was near
    index.add(moved, ids[:1])
    index.build()
    assert len(index) == 2000
    assert index.search(moved, 1).ids[0, 0] == ids[0]
    assert ids[0] not in index.search(vectors[:1], 20).ids[0].tolist()


def test_contract_save_load_same_results(case: IndexCase, metric: str, tmp_path) -> None:
    vectors, ids = _data()
    index = _built(case, metric, vectors, ids)
    index.save(tmp_path / "index")
    loaded = type(index).load(tmp_path / "index")
    assert (len(loaded), loaded.dim, loaded.metric) == (len(index), index.dim, index.metric)
    queries = vectors[:100] + 0.05
    before, after = index.search(queries, 5), loaded.search(queries, 5)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
    loaded.remove(ids[:1])  # a loaded index can still be changed
    loaded.build()
    assert ids[0] not in loaded.search(vectors[:1], 5).ids[0].tolist()


def test_contract_pickle_round_trip(case: IndexCase, metric: str) -> None:
    vectors, ids = _data()
    index = _built(case, metric, vectors, ids)
    copy = pickle.loads(pickle.dumps(index))
    before, after = index.search(vectors[:100], 5), copy.search(vectors[:100], 5)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
    copy.remove(ids[:10])
    assert len(copy) == 1990 and len(index) == 2000


def test_contract_length(case: IndexCase) -> None:
    vectors, ids = _data(n=50)
    index = case.make(32, "cosine")
    assert len(index) == 0
    index.add(vectors[:30], ids[:30])
    index.add(vectors[20:], ids[20:])  # 10 re-added, 20 new
    assert len(index) == 50
    index.remove(ids[:5])
    assert len(index) == 45
    index.build()
    assert len(index) == 45


def test_contract_bad_input_is_a_user_error(case: IndexCase) -> None:
    index = case.make(8, "cosine")
    with pytest.raises(UserError, match=r"7.*8"):  # both dimensions are named
        index.add(torch.randn(3, 7), torch.arange(3))
    with pytest.raises(UserError, match="ids"):
        index.add(torch.randn(3, 8), torch.arange(2))
    index.add(torch.randn(3, 8), torch.arange(3))
    index.build()
    with pytest.raises(UserError, match=r"9.*8"):
        index.search(torch.randn(1, 9), 1)
    with pytest.raises(UserError, match="k"):
        index.search(torch.randn(1, 8), 0)


def test_contract_recall_at_5_against_exact(recall_case: IndexCase) -> None:
    # 20k clustered vectors: on unclustered data every approximate method stays ≤ 0.5.
    vectors = clustered(20_000, 64, clusters=200, noise=0.35, seed=1)
    ids = torch.arange(20_000) + 100
    queries = clustered(500, 64, clusters=200, noise=0.35, seed=1) + 0.05 * torch.randn(500, 64)
    exact = _built(CASES[0], "cosine", vectors, ids)
    index = _built(recall_case, "cosine", vectors, ids)
    if isinstance(index, ScannIndex):  # the tree and the hashing really are in use
        params = index.build_params
        assert not params["brute_force"]
        assert params["num_leaves"] >= 50 and params["num_leaves_to_search"] < params["num_leaves"]
    truth, found = exact.search(queries, 5).ids, index.search(queries, 5).ids
    recall = np.mean(
        [len(set(a) & set(b)) / 5 for a, b in zip(truth.tolist(), found.tolist(), strict=True)]
    )
    assert recall >= recall_case.min_recall, recall


# --- ScannIndex specifics ----------------------------------------------------------------


def test_scann_updates_apply_at_once_and_build_retrains() -> None:
    vectors, ids = _data()
    index = _scann_tree(32, "cosine")
    index.add(vectors[:1500], ids[:1500])
    index.build()
    assert index.build_params["size"] == 1500
    index.add(vectors[1500:], ids[1500:])  # no build(): ScaNN's incremental upsert
    index.remove(ids[:100])  # ... and delete
    new = index.search(vectors[1500:1800], 1).ids[:, 0]
    assert (new == ids[1500:1800]).float().mean() >= 0.95
    assert not bool(torch.isin(index.search(vectors[:100], 10).ids, ids[:100]).any())
    index.build()  # retrains on the current 1,900 vectors, read back from ScaNN
    assert index.build_params["size"] == 1900 and len(index) == 1900
    assert (index.search(vectors[100:], 1).ids[:, 0] == ids[100:]).float().mean() >= 0.95


def test_scann_rederives_parameters_when_it_grows() -> None:
    vectors, ids = _data(n=3000)
    index = ScannIndex(32, brute_force_below=1000)
    index.add(vectors[:500], ids[:500])
    index.build()
    assert index.build_params == {"brute_force": True, "size": 500}
    index.add(vectors[500:], ids[500:])
    index.build()
    params = index.build_params
    assert not params["brute_force"]
    assert params["num_leaves"] == round(math.sqrt(3000)) and params["num_leaves_to_search"] == 3


def test_scann_search_before_build_is_an_error() -> None:
    index = ScannIndex(8)
    index.add(torch.randn(4, 8), torch.arange(4))
    with pytest.raises(UserError, match="build"):
        index.search(torch.randn(1, 8), 1)


def test_scann_unbuilt_index_saves_and_loads(tmp_path) -> None:
    vectors, ids = _data(n=100)
    index = ScannIndex(32)
    index.add(vectors, ids)
    index.save(tmp_path)
    loaded = ScannIndex.load(tmp_path)
    assert len(loaded) == 100
    with pytest.raises(UserError, match="build"):
        loaded.search(vectors[:1], 1)
    loaded.build()
    assert loaded.search(vectors[:3], 1).ids[:, 0].tolist() == ids[:3].tolist()


def test_scann_build_logs_stay_off_the_terminal(capfd, caplog) -> None:
    vectors, ids = _data()
    caplog.set_level("DEBUG", logger="m3.backends.scann_index")
    _built(IndexCase("tree", _scann_tree, exact=False), "cosine", vectors, ids)
    assert capfd.readouterr().err == ""
    assert "partitioner" in caplog.text.lower()  # ScaNN did log, into the logger


def test_native_stderr_is_restored_after_an_error(capfd) -> None:
    with pytest.raises(ValueError) as raised, native_stderr_to_log():
        os.write(2, b"native noise\n")
        raise ValueError("boom")
    os.write(2, b"visible\n")
    assert capfd.readouterr().err == "visible\n"
    if sys.version_info >= (3, 11):
        assert "native noise" in "".join(raised.value.__notes__)


def test_scann_missing_gives_the_install_hint(monkeypatch) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "scann"] + ["scann"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install memory3-lm\[scann\]"):
        ScannIndex(8)


def test_scann_rejects_bad_parameters() -> None:
    with pytest.raises(UserError, match="num_leaves_to_search"):
        ScannIndex(8, num_leaves=10, num_leaves_to_search=11)
    with pytest.raises(UserError, match="cosine"):
        ScannIndex(8, metric="l2")
    with pytest.raises(UserError, match="dimensions_per_block"):
        ScannIndex(8, dimensions_per_block=9)


def test_loading_another_index_class_is_a_user_error(tmp_path) -> None:
    index = ExactIndex(4)
    index.add(torch.randn(2, 4), torch.arange(2))
    index.save(tmp_path)
    with pytest.raises(UserError, match="ExactIndex"):
        ScannIndex.load(tmp_path)
