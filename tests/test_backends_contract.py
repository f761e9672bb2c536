"""The contract every `MemoryStore` keeps, run over every shipped store.

Each store enters through a `StoreFactory`: how to create one in a directory, how the next
process would see it (reopened from its file, or an unpickled copy), and, for stores kept
in files, how to damage one reference's bytes on disk.

Running the suite on your own store: in a test module next to this one, import the tests
and override the two fixtures with your factory (pytest gives the module's own fixtures to
the imported tests):

    import pytest
    from test_backends_contract import *  # noqa: F403 - the contract tests
    from test_backends_contract import StoreFactory

    MINE = StoreFactory(
        "mine",
        create=lambda directory, info: MyStore(directory / "bank", info=info),
        reopen=lambda store: MyStore(store.path),          # or leave out: a pickle round trip
        footprint=lambda store: store.bytes_on_disk(),     # grows with slots, not references
        damage=flip_one_byte_of,                           # or None for a store without files
    )

    @pytest.fixture(params=[MINE], ids=lambda f: f.name)
    def store_factory(request):
        return request.param

    @pytest.fixture(params=[MINE], ids=lambda f: f.name)
    def damageable_factory(request):
        return request.param

Or append your factory to `STORE_FACTORIES` below. Tests at the end of the file are about
`HDF5Store` only (its file format, completeness flag and process handling).

Quantized stores (`quantizer=`) run the same contract: what they must return is not the
written memory bit for bit but `quantizer.decode(quantizer.encode(memory))` bit for bit
(`as_stored`), i.e. the written memory within exactly the quantizer's own reconstruction
error. The quantizers here are trained product quantizers of 3 bits (8 centroids), so that
they train in milliseconds for every head dimension the suite draws.
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3.backends.base import (
    CorruptReferenceError,
    MemoryStore,
    MissingReferenceError,
    StoreInfo,
    with_quantizer,
)
from m3.backends.hdf5_store import HDF5Store
from m3.backends.in_memory import InMemoryStore
from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.data.chunking import Reference
from m3.memory.quantize import Int8Quantizer, MemoryQuantizer, ProductQuantizer, relative_error

ROOT = Path(__file__).resolve().parents[1]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def pickle_round_trip(store: MemoryStore) -> MemoryStore:
    return pickle.loads(pickle.dumps(store))


@dataclass(frozen=True)
class StoreFactory:
    """How the contract suite makes and handles one kind of store.

    Attributes:
        name: Shown in test ids.
        create: Makes an empty, writable store for `info`; its files go in the directory.
        reopen: The store as the next process sees it, after the writer finished (closed it,
            marked it complete): reopened from its files, or an unpickled copy.
        footprint: Storage the store has reserved (bytes, slots…): reusing freed slots
            must keep it the same.
        damage: Flips one byte of a stored reference's payload where the store keeps it
            (the store may be closed for it); None for stores with nothing to damage.
    """

    name: str
    create: Callable[[Path, StoreInfo], MemoryStore]
    reopen: Callable[[MemoryStore], MemoryStore] = pickle_round_trip
    footprint: Callable[[MemoryStore], int] | None = None
    damage: Callable[[MemoryStore, int], None] | None = None


def reopen_hdf5(store: MemoryStore) -> MemoryStore:
    assert isinstance(store, HDF5Store)
    if store._writable:
        store.mark_complete()
    store.close()
    return HDF5Store(store.path)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x10]))


def damage_hdf5(store: MemoryStore, reference_id: int) -> None:
    assert isinstance(store, HDF5Store)
    offset, _ = store.row_location(reference_id)
    store.close()
    flip_byte(store.path, offset + 1)  # one byte of the keys


_files = itertools.count()


@functools.cache
def trained_quantizer(dim: int) -> MemoryQuantizer:
    """A 3-bit product quantizer per head dimension; keys and values trained apart."""
    generator = torch.Generator().manual_seed(dim)
    quantizer = MemoryQuantizer(ProductQuantizer(dim, subspaces=1, bits=3, iterations=5))
    quantizer.keys.fit(torch.randn(64, dim, generator=generator), seed=0)
    quantizer.values.fit(3 * torch.randn(64, dim, generator=generator), seed=1)
    return quantizer


def as_stored(store: MemoryStore, memory: SparseMemory) -> SparseMemory:
    """What a store must return for memories written in one call: the memories themselves,
    or, in a quantized store, their decoded codes in the store's dtype."""
    quantizer = getattr(store, "quantizer", None)
    if quantizer is None:
        return memory
    return quantizer.decode(quantizer.encode(memory), dtype=store.info.torch_dtype)


STORE_FACTORIES = [
    StoreFactory(
        "in_memory",
        create=lambda directory, info: InMemoryStore(info),
        footprint=lambda store: store.capacity,  # type: ignore[attr-defined]
    ),
    StoreFactory(
        "hdf5",
        create=lambda directory, info: HDF5Store(
            directory / f"store{next(_files)}.h5", info=info, mode="w"
        ),
        reopen=reopen_hdf5,
        footprint=lambda store: os.path.getsize(store.path),  # type: ignore[attr-defined]
        damage=damage_hdf5,
    ),
    StoreFactory(
        "in_memory+pq",
        create=lambda directory, info: InMemoryStore(
            info, quantizer=trained_quantizer(info.memory_shape[4])
        ),
        footprint=lambda store: store.capacity,  # type: ignore[attr-defined]
    ),
    StoreFactory(
        "hdf5+pq",
        create=lambda directory, info: HDF5Store(
            directory / f"store{next(_files)}.h5",
            info=info,
            mode="w",
            quantizer=trained_quantizer(info.memory_shape[4]),
        ),
        reopen=reopen_hdf5,
        footprint=lambda store: os.path.getsize(store.path),  # type: ignore[attr-defined]
        damage=damage_hdf5,
    ),
]


@pytest.fixture(params=STORE_FACTORIES, ids=lambda f: f.name)
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    return request.param


@pytest.fixture(params=[f for f in STORE_FACTORIES if f.damage], ids=lambda f: f.name)
def damageable_factory(request: pytest.FixtureRequest) -> StoreFactory:
    return request.param


# ----------------------------------------------------------------------------- data
def info_for(
    shape: tuple[int, ...] = (2, 2, 2, 4, 8), dtype: str = "bfloat16", **extra: object
) -> StoreInfo:
    return StoreInfo(memory_shape=shape, dtype=dtype, **extra)  # type: ignore[arg-type]


def random_memory(count: int, info: StoreInfo, *, seed: int = 0, keep: float = 0.7) -> SparseMemory:
    """Memories of random bit patterns (NaNs, infinities, subnormals included)."""
    generator = torch.Generator().manual_seed(seed)
    layers, _, heads, tokens, dim = info.memory_shape
    bits = INT_VIEW[info.torch_dtype]
    info_of = torch.iinfo(bits)
    shape = (count, layers, heads, tokens, dim)
    keys, values = (
        torch.randint(info_of.min, info_of.max, shape, dtype=bits, generator=generator).view(
            info.torch_dtype
        )
        for _ in range(2)
    )
    valid = torch.rand(count, tokens, generator=generator) < keep
    positions = torch.randint(0, 128, (count, layers, heads, tokens), generator=generator)
    positions[~valid[:, None, None, :].expand_as(positions)] = -1
    return SparseMemory(keys, values, valid, positions)


def references_for(ids: list[int]) -> list[Reference]:
    return [
        Reference(f"doc-{i}" if i % 2 else i, 3 * i, 3 * i + i % 7, tuple(range(i % 7)))
        for i in ids
    ]


def assert_same_memory(got: SparseMemory, want: SparseMemory) -> None:
    bits = INT_VIEW[want.keys.dtype]
    assert got.keys.dtype == want.keys.dtype
    assert got.keys.shape == want.keys.shape
    assert torch.equal(got.keys.view(bits), want.keys.view(bits))
    assert torch.equal(got.values.view(bits), want.values.view(bits))
    assert torch.equal(got.valid, want.valid)
    assert got.positions.dtype == torch.long
    assert torch.equal(got.positions, want.positions)


def filled(
    factory: StoreFactory, directory: Path, ids: list[int], info: StoreInfo | None = None
) -> tuple[MemoryStore, SparseMemory, list[Reference]]:
    info = info or info_for()
    store = factory.create(directory, info)
    memory, references = random_memory(len(ids), info), references_for(ids)
    store.write(ids, memory, references)
    return store, memory, references


# ----------------------------------------------------------------------------- contract
@st.composite
def write_and_read(draw: st.DrawFn) -> tuple[StoreInfo, list[int], list[int], int, float]:
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    shape = (
        draw(st.integers(1, 3)),
        2,
        draw(st.integers(1, 3)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 8)),
    )
    # small ids, and ids spread over the whole int64 range (hashes)
    id_values = st.one_of(st.integers(0, 80), st.integers(0, 2**63 - 1))
    ids = draw(st.lists(id_values, min_size=1, max_size=12, unique=True))
    reads = draw(st.lists(st.sampled_from(ids), max_size=20))  # repeats allowed
    return info_for(shape, dtype), ids, reads, draw(st.integers(0, 2**31)), draw(st.floats(0, 1))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=write_and_read())
def test_round_trip_is_bit_exact(store_factory: StoreFactory, tmp_path: Path, case) -> None:
    info, ids, reads, seed, keep = case
    store = store_factory.create(Path(tempfile.mkdtemp(dir=tmp_path)), info)
    memory = random_memory(len(ids), info, seed=seed, keep=keep)
    references = references_for([i % 1000 for i in ids])
    store.write(torch.tensor(ids), memory, references)
    where = {reference_id: row for row, reference_id in enumerate(ids)}
    rows = torch.tensor([where[i] for i in reads], dtype=torch.long)
    want = as_stored(store, memory)[rows]
    assert_same_memory(store.read(torch.tensor(reads, dtype=torch.long)), want)
    assert_same_memory(store.read(reads), want)  # a list works as well as a tensor
    assert store.references(reads) == [references[where[i]] for i in reads]
    assert store.ids().tolist() == sorted(ids)
    assert len(store) == len(ids)
    store.close()


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, list[int]]]:
    ids = st.lists(st.integers(0, 40), min_size=1, max_size=8, unique=True)
    return draw(st.lists(st.tuples(st.sampled_from(["write", "delete"]), ids), max_size=8))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations(), seed=st.integers(0, 2**31))
def test_writes_updates_and_deletes_match_a_dict(
    store_factory: StoreFactory, tmp_path: Path, ops: list[tuple[str, list[int]]], seed: int
) -> None:
    info = info_for()
    store = store_factory.create(Path(tempfile.mkdtemp(dir=tmp_path)), info)
    model: dict[int, tuple[SparseMemory, Reference]] = {}
    for step, (op, ids) in enumerate(ops):
        if op == "write":  # new ids land in freed slots, updates overwrite in place
            memory = random_memory(len(ids), info, seed=seed + step)
            references = references_for([i + step for i in ids])
            store.write(ids, memory, references)
            memory = as_stored(store, memory)
            model.update({i: (memory[j], references[j]) for j, i in enumerate(ids)})
        elif all(i in model for i in ids):
            store.delete(ids)
            for i in ids:
                del model[i]
        else:
            with pytest.raises(MissingReferenceError):
                store.delete(ids)
    stored = sorted(model)
    assert store.ids().tolist() == stored and len(store) == len(stored)
    if stored:
        want = SparseMemory.cat([model[i][0] for i in stored])
        assert_same_memory(store.read(stored), want)
        assert store.references(stored) == [model[i][1] for i in stored]
    store.close()


def test_earlier_reads_stay_intact(store_factory: StoreFactory, tmp_path: Path) -> None:
    # A store may recycle read buffers, but never under a result that is still in use.
    store, memory, _ = filled(store_factory, tmp_path, list(range(8)))
    memory = as_stored(store, memory)
    first = store.read([0, 1])
    kept_keys = store.read([2, 3]).keys  # only part of a result is kept
    for i in range(4, 8):
        store.read([i, i])
    assert_same_memory(first, memory[torch.tensor([0, 1])])
    assert torch.equal(kept_keys.view(torch.int16), memory.keys[2:4].view(torch.int16))


def test_memories_of_another_float_dtype_are_cast(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    store = store_factory.create(tmp_path, info_for(dtype="bfloat16"))
    memory = random_memory(3, info_for(dtype="float32"))
    memory.keys, memory.values = memory.keys.clamp(-1e3, 1e3), memory.values.clamp(-1e3, 1e3)
    store.write([0, 1, 2], memory, references_for([0, 1, 2]))
    assert_same_memory(store.read([0, 1, 2]), as_stored(store, memory).to(dtype=torch.bfloat16))


def test_update_overwrites(store_factory: StoreFactory, tmp_path: Path) -> None:
    store, memory, references = filled(store_factory, tmp_path, [1, 2, 3])
    new_memory = random_memory(1, store.info, seed=7)
    new_reference = Reference("other", 10, 12, (5, 6))
    store.write([2], new_memory, [new_reference])
    assert_same_memory(store.read([2]), as_stored(store, new_memory))
    assert_same_memory(store.read([1, 3]), as_stored(store, memory)[torch.tensor([0, 2])])
    assert store.references([2, 1]) == [new_reference, references[0]]
    assert len(store) == 3


def test_delete_then_read_raises(store_factory: StoreFactory, tmp_path: Path) -> None:
    store, memory, _ = filled(store_factory, tmp_path, [1, 2, 3])
    store.delete([2])
    with pytest.raises(MissingReferenceError, match=r"\b2\b"):
        store.read([1, 2])
    with pytest.raises(MissingReferenceError, match=r"\b2\b"):
        store.references([2])
    assert 2 not in store and 1 in store
    assert len(store) == 2
    assert store.ids().tolist() == [1, 3]
    assert_same_memory(store.read([3, 1]), as_stored(store, memory)[torch.tensor([2, 0])])


def test_deleting_a_missing_id_deletes_nothing(store_factory: StoreFactory, tmp_path: Path) -> None:
    store, _, _ = filled(store_factory, tmp_path, [1, 2, 3])
    with pytest.raises(MissingReferenceError, match=r"\b9\b"):
        store.delete([1, 9])
    assert store.ids().tolist() == [1, 2, 3]


def test_reading_a_missing_id_names_it(store_factory: StoreFactory, tmp_path: Path) -> None:
    store, _, _ = filled(store_factory, tmp_path, [1, 2, 3])
    with pytest.raises(MissingReferenceError, match=r"\b42\b"):
        store.read([1, 42])
    with pytest.raises(KeyError):  # MissingReferenceError is also a KeyError
        store.read([42])


def test_freed_slots_are_reused(store_factory: StoreFactory, tmp_path: Path) -> None:
    assert store_factory.footprint is not None, "give the factory a footprint"
    store, _, _ = filled(store_factory, tmp_path, list(range(64)))
    before = store_factory.footprint(store)
    store.delete(list(range(10, 20)))
    new_ids = list(range(100, 110))
    new_memory = random_memory(10, store.info, seed=3)
    store.write(new_ids, new_memory, references_for(new_ids))
    assert store_factory.footprint(store) == before
    assert_same_memory(store.read(new_ids), as_stored(store, new_memory))
    # the footprint does grow once the freed slots are used up
    store.write([200], random_memory(1, store.info), references_for([200]))
    assert store_factory.footprint(store) > before


def test_references_round_trip(store_factory: StoreFactory, tmp_path: Path) -> None:
    info = info_for()
    store = store_factory.create(tmp_path, info)
    references = [
        Reference("café/ü 文档.txt", 0, 3, (1, 2, 2**31 - 1)),
        Reference(17, 128, 256, tuple(range(128))),
        Reference("17", 5, 5, ()),
        Reference(np.int64(4), np.int64(1), np.int64(4), np.array([7, 8, 9])),  # type: ignore[arg-type]
    ]
    store.write([5, 6, 7, 8], random_memory(4, info), references)
    got = store.references([8, 7, 6, 5])
    assert got == [
        Reference(4, 1, 4, (7, 8, 9)),
        Reference("17", 5, 5, ()),
        Reference(17, 128, 256, tuple(range(128))),
        Reference("café/ü 文档.txt", 0, 3, (1, 2, 2**31 - 1)),
    ]
    assert type(got[2].doc_id) is int and type(got[1].doc_id) is str
    assert all(type(i) is int for i in got[0].ids)


def test_reopen_keeps_everything(store_factory: StoreFactory, tmp_path: Path) -> None:
    info = info_for(model_fingerprint="f" * 64, reference_prefix=(1, 2), extra={"k": [1, 2]})
    store, memory, references = filled(store_factory, tmp_path, [4, 9, 1], info)
    store.delete([9])
    want = as_stored(store, memory)[torch.tensor([2, 0, 2])]
    reopened = store_factory.reopen(store)
    assert reopened.info == store.info == with_quantizer(info, getattr(store, "quantizer", None))
    assert reopened.ids().tolist() == [1, 4]
    assert len(reopened) == 2
    assert_same_memory(reopened.read([1, 4, 1]), want)
    assert reopened.references([4, 1]) == [references[0], references[2]]
    assert reopened.verify() == []


def test_length_and_membership(store_factory: StoreFactory, tmp_path: Path) -> None:
    store = store_factory.create(tmp_path, info_for())
    assert len(store) == 0 and store.ids().tolist() == []
    store.write([3, 5], random_memory(2, store.info), references_for([3, 5]))
    assert len(store) == 2
    assert 3 in store and np.int64(5) in store
    assert 4 not in store and "3" not in store and 3.0 not in store


def test_empty_read(store_factory: StoreFactory, tmp_path: Path) -> None:
    store, _, _ = filled(store_factory, tmp_path, [1])
    empty = store.read([])
    assert len(empty) == 0 and empty.shape == store.info.memory_shape
    assert store.references([]) == []


def test_pickled_store_reads_the_same(store_factory: StoreFactory, tmp_path: Path) -> None:
    store, memory, references = filled(store_factory, tmp_path, [1, 2, 3])
    store.read([1])  # open whatever the store opens lazily
    copy = pickle.loads(pickle.dumps(store))
    assert_same_memory(copy.read([3, 1]), as_stored(store, memory)[torch.tensor([2, 0])])
    assert copy.references([2]) == [references[1]]
    assert copy.info == store.info


def test_pickled_stores_read_the_same_in_another_process(tmp_path: Path) -> None:
    # One subprocess for all stores: importing torch there takes seconds.
    stores, expected = [], []
    for factory in STORE_FACTORIES:
        (tmp_path / factory.name).mkdir()
        store, memory, _ = filled(factory, tmp_path / factory.name, [1, 2, 3])
        store.read([2])
        stores.append(store)
        expected.append(as_stored(store, memory)[torch.tensor([2, 1, 2])])
    (tmp_path / "stores.pkl").write_bytes(pickle.dumps(stores))
    script = (
        "import pickle, sys, torch\n"
        "stores = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "torch.save([s.read([3, 2, 3]) for s in stores], sys.argv[2])\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, tmp_path / "stores.pkl", tmp_path / "out.pt"],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    for got, want in zip(
        torch.load(tmp_path / "out.pt", weights_only=False), expected, strict=True
    ):
        assert_same_memory(got, want)


# K/V (dimension 1) is not a dimension of SparseMemory, so it cannot differ
@pytest.mark.parametrize(
    "dimension, name", [(0, "(L_mem)"), (2, "(H_kv)"), (3, "(k)"), (4, "(d_h)")]
)
def test_wrong_memory_shape_is_refused_naming_the_dimension(
    store_factory: StoreFactory, tmp_path: Path, dimension: int, name: str
) -> None:
    info = info_for()
    store = store_factory.create(tmp_path, info)
    shape = list(info.memory_shape)
    shape[dimension] += 1
    wrong = random_memory(1, info_for(tuple(shape)))
    with pytest.raises(UserError, match=rf"{name}.*is {shape[dimension]}"):
        store.write([1], wrong, references_for([1]))
    assert len(store) == 0


def test_check_model_refuses_other_weights_naming_both(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    mine, other = "a" * 64, "b" * 64
    store, _, _ = filled(store_factory, tmp_path, [1], info_for(model_fingerprint=mine))
    reopened = store_factory.reopen(store)
    shape = reopened.info.memory_shape
    reopened.info.check_model(shape, mine, where="store")  # the writing model passes
    with pytest.raises(UserError, match=rf"{mine[:16]}.*{other[:16]}"):
        reopened.info.check_model(shape, other, where="store")
    wider = (*shape[:4], shape[4] * 2)
    with pytest.raises(UserError, match=r"head dimension \(d_h\)"):
        reopened.info.check_model(wider, mine, where="store")


@pytest.mark.parametrize(
    "ids, message",
    [([1, 1], "twice"), ([1, -2], "≥ 0"), ([1], "as many"), ([1.0, 2.0], "integers")],
)
def test_bad_writes_are_refused_and_store_nothing(
    store_factory: StoreFactory, tmp_path: Path, ids: list, message: str
) -> None:
    store = store_factory.create(tmp_path, info_for())
    with pytest.raises(UserError, match=message):
        store.write(ids, random_memory(2, store.info), references_for([1, 2]))
    assert len(store) == 0


def test_a_flipped_byte_is_reported_with_the_id(
    damageable_factory: StoreFactory, tmp_path: Path
) -> None:
    store, memory, _ = filled(damageable_factory, tmp_path, [1, 2, 3, 4])
    memory = as_stored(store, memory)
    reopened = damageable_factory.reopen(store)
    assert damageable_factory.damage is not None
    damageable_factory.damage(reopened, 3)
    with pytest.raises(CorruptReferenceError, match=r"\b3\b"):
        reopened.read([1, 3])
    assert_same_memory(reopened.read([4, 1]), memory[torch.tensor([3, 0])])
    assert reopened.verify() == [3]
    assert reopened.verify([1, 2]) == []


# ----------------------------------------------------------------------------- HDF5Store
def test_hdf5_missing_file_and_missing_info_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nowhere\.h5"):
        HDF5Store(tmp_path / "nowhere.h5")
    with pytest.raises(UserError, match=r"new\.h5.*needs info"):
        HDF5Store(tmp_path / "new.h5", mode="w")
    with pytest.raises(UserError, match="mode"):
        HDF5Store(tmp_path / "new.h5", info=info_for(), mode="x")  # type: ignore[arg-type]
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match=r"text\.h5"):
        HDF5Store(tmp_path / "text.h5")
    with pytest.raises(UserError, match="verify_reads"):
        HDF5Store(tmp_path / "new.h5", info=info_for(), mode="w", verify_reads="sometimes")  # type: ignore[arg-type]


def test_hdf5_file_describes_itself(tmp_path: Path) -> None:
    info = info_for((2, 2, 3, 4, 5), "bfloat16", model_fingerprint="x" * 64)
    with HDF5Store(tmp_path / "s.h5", info=info, mode="w") as store:
        memory = random_memory(2, info)
        store.write([0, 1], memory, references_for([0, 1]))
        store.mark_complete()
    with h5py.File(tmp_path / "s.h5", "r") as file:
        assert StoreInfo.from_json(file.attrs["info"]) == info
        assert bool(file.attrs["complete"]) and file.attrs["checksum"] == "crc32"
        segment = file["payload/000000"]
        assert segment.chunks is None and segment.compression is None
        row = segment[1]  # bf16 keys are kept as their 16-bit patterns
    want = memory.keys[1].contiguous().view(torch.uint8).flatten().numpy()
    assert np.array_equal(row[: want.size], want)
    assert HDF5Store(tmp_path / "s.h5").info == info


def test_hdf5_info_that_disagrees_with_the_file_is_refused(tmp_path: Path) -> None:
    HDF5Store(tmp_path / "s.h5", info=info_for(model_fingerprint="a"), mode="w").close()
    with pytest.raises(UserError, match="model_fingerprint"):
        HDF5Store(tmp_path / "s.h5", info=info_for(model_fingerprint="b"), mode="a")
    store = HDF5Store(tmp_path / "s.h5", info=info_for(model_fingerprint="a"), mode="a")
    assert store.info.model_fingerprint == "a"


def test_hdf5_incomplete_store_is_refused_in_read_mode(tmp_path: Path) -> None:
    store, memory, _ = filled(STORE_FACTORIES[1], tmp_path, [1, 2])
    store.close()
    path = store.path  # type: ignore[attr-defined]
    with pytest.raises(UserError, match=r"incomplete.*mode='a'"):
        HDF5Store(path)
    assert_same_memory(HDF5Store(path, allow_incomplete=True).read([2]), memory[1:])
    resumed = HDF5Store(path, mode="a")  # a build resumes, then completes
    resumed.write([3], random_memory(1, resumed.info), references_for([3]))
    resumed.mark_complete()
    resumed.close()
    assert HDF5Store(path).ids().tolist() == [1, 2, 3]


def test_hdf5_interrupted_write_leaves_store_incomplete_and_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, memory, _ = filled(STORE_FACTORIES[1], tmp_path, [1, 2])
    assert isinstance(store, HDF5Store)
    store.mark_complete()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_meta", fail)
    with pytest.raises(OSError, match="disk full"):
        store.write([3], random_memory(1, store.info), references_for([3]))
    monkeypatch.undo()
    assert not store.complete
    assert 3 not in store and store.ids().tolist() == [1, 2]
    store.close()
    with pytest.raises(UserError, match="incomplete"):
        HDF5Store(store.path)
    reopened = HDF5Store(store.path, allow_incomplete=True)
    assert_same_memory(reopened.read([1, 2]), memory)
    assert reopened.verify() == []


def test_hdf5_updating_a_complete_store_keeps_it_complete(tmp_path: Path) -> None:
    store, _, _ = filled(STORE_FACTORIES[1], tmp_path, [1, 2])
    assert isinstance(store, HDF5Store)
    store.mark_complete()
    store.write([2], random_memory(1, store.info, seed=5), references_for([2]))
    store.delete([1])
    assert store.complete


def test_hdf5_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    store, memory, _ = filled(STORE_FACTORIES[1], tmp_path, list(range(10)))
    assert isinstance(store, HDF5Store)
    store.mark_complete()
    store.close()
    path = store.path
    # cut while open: the rows past the end are reported by id
    reader = HDF5Store(path)
    reader.read([0])
    last_row_end = sum(reader.row_location(9))
    os.truncate(path, last_row_end - 10)
    with pytest.raises(CorruptReferenceError, match=r"\b9\b"):
        reader.read([0, 9])
    assert_same_memory(reader.read([0]), memory[:1])
    assert 9 in reader.verify()  # (the cut may take provenance with it: then all are listed)
    reader.close()
    # cut before opening: HDF5 itself notices, and the error names the file
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CorruptReferenceError, match=rf"{path.name}.*truncated"):
        HDF5Store(path)


def test_hdf5_reads_always_check_the_stored_id(tmp_path: Path) -> None:
    store, _, _ = filled(STORE_FACTORIES[1], tmp_path, [1, 2])
    assert isinstance(store, HDF5Store)
    offset, row_bytes = store.row_location(2)
    store.mark_complete()
    store.close()
    with open(store.path, "r+b") as file:  # zero the row, as a hole in the file reads
        file.seek(offset)
        file.write(bytes(row_bytes))
    with pytest.raises(CorruptReferenceError, match=r"\b2\b"):
        HDF5Store(store.path, verify_reads="never").read([2])


def test_hdf5_verify_reads_modes(tmp_path: Path) -> None:
    store, memory, _ = filled(STORE_FACTORIES[1], tmp_path, [1, 2])
    assert isinstance(store, HDF5Store)
    offsets = [store.row_location(i)[0] for i in (1, 2)]
    reopen_hdf5(store)
    first = HDF5Store(store.path)  # default: "first"
    first.read([1])  # row 1 verified in this process
    for offset in offsets:
        flip_byte(store.path, offset + 1)
    # "never" returns the damaged bytes (documented), the others report them
    never = HDF5Store(store.path, verify_reads="never").read([1])
    assert not torch.equal(never.keys.view(torch.int16), memory.keys[:1].view(torch.int16))
    with pytest.raises(CorruptReferenceError, match=r"\b1\b"):
        HDF5Store(store.path, verify_reads="always").read([1])
    with pytest.raises(CorruptReferenceError, match=r"\b2\b"):
        first.read([2])


def test_hdf5_pickled_open_store_carries_no_handle(tmp_path: Path) -> None:
    store, memory, _ = filled(STORE_FACTORIES[1], tmp_path, [1, 2])
    assert isinstance(store, HDF5Store)
    store.read([1])  # h5py handle and descriptor open
    assert store._file is not None and store._fd is not None
    copy = pickle.loads(pickle.dumps(store))
    assert copy._file is None and copy._fd is None and copy._tables is None
    assert_same_memory(copy.read([2]), memory[1:])
    with pytest.raises(UserError, match="read-only"):  # a copy never writes
        copy.write([5], random_memory(1, store.info), references_for([5]))


def test_hdf5_forked_process_reopens_its_own_handles(tmp_path: Path) -> None:
    store, memory, references = filled(STORE_FACTORIES[1], tmp_path, [1, 2, 3])
    assert isinstance(store, HDF5Store)
    store.read([1])
    inherited = store._file
    want = memory[torch.tensor([2])]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as a DataLoader worker started by fork
        code = 1
        try:
            got = store.read([3])
            same = torch.equal(got.keys.view(torch.int16), want.keys.view(torch.int16))
            same &= store.references([3]) == references[2:]
            own = store._pid == os.getpid() and store._file is not inherited
            code = 0 if same and own else 1
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"\x00" and status == 0
    assert_same_memory(store.read([3]), want)  # the parent's handles still work


def test_hdf5_positions_beyond_int16_are_refused_naming_the_reference(tmp_path: Path) -> None:
    store = HDF5Store(tmp_path / "s.h5", info=info_for(), mode="w")
    memory = random_memory(2, store.info)
    memory.positions[1, 0, 0, 0] = 40_000
    with pytest.raises(UserError, match=r"reference 8 .*int16"):
        store.write([7, 8], memory, references_for([7, 8]))
    assert len(store) == 0


def test_hdf5_segments_grow_and_keep_rows_apart(tmp_path: Path) -> None:
    info = info_for((1, 2, 1, 2, 2), "float32")
    store = HDF5Store(tmp_path / "s.h5", info=info, mode="w", segment_bytes=4 * 1024)
    ids = list(range(300))
    memory = random_memory(300, info)
    for start in range(0, 300, 70):  # several writes across several segments
        part = ids[start : start + 70]
        store.write(part, memory[start : start + 70], references_for(part))
    with h5py.File(store.path, "r") as file:
        assert len(file["payload"]) > 2
    reversed_ids = ids[::-1]
    assert_same_memory(store.read(reversed_ids), memory[torch.tensor(reversed_ids)])
    assert store.verify() == []


# ----------------------------------------------------------------------------- quantized
def finite_memory(count: int, info: StoreInfo, *, seed: int = 0) -> SparseMemory:
    """Memories of normal key/value vectors (as a model writes them)."""
    memory = random_memory(count, info, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    memory.keys = torch.randn(memory.keys.shape, generator=generator).to(memory.keys.dtype)
    memory.values = torch.randn(memory.values.shape, generator=generator).to(memory.keys.dtype)
    return memory


def fitted(quantizer: MemoryQuantizer, info: StoreInfo) -> MemoryQuantizer:
    return quantizer.fit(finite_memory(32, info, seed=99))


@pytest.mark.parametrize("kind", ["in_memory", "hdf5"])
@pytest.mark.parametrize("codec", ["int8", "composite"])
def test_a_quantized_store_errs_exactly_as_its_quantizer(
    tmp_path: Path, kind: str, codec: str
) -> None:
    from m3.memory.quantize import CompositeQuantizer

    info = info_for((2, 2, 2, 4, 8), "float32")
    vectors = {
        "int8": Int8Quantizer(8),
        "composite": CompositeQuantizer(8, opq_subspaces=2, opq_bits=3, opq_iterations=2,
                                        coarse_codes=2, coarse_bits=3, pq_subspaces=2,
                                        pq_bits=3, iterations=5),
    }[codec]  # fmt: skip
    quantizer = fitted(MemoryQuantizer(vectors), info)
    store: MemoryStore = (
        InMemoryStore(info, quantizer=quantizer)
        if kind == "in_memory"
        else HDF5Store(tmp_path / "q.h5", info=info, mode="w", quantizer=quantizer)
    )
    memory = finite_memory(6, info, seed=3)
    store.write(range(6), memory, references_for(list(range(6))))
    got = store.read([5, 0, 3])
    want = quantizer.decode(quantizer.encode(memory))[torch.tensor([5, 0, 3])]
    torch.testing.assert_close(got.keys, want.keys, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.values, want.values, atol=1e-6, rtol=0)
    assert torch.equal(got.valid, want.valid) and torch.equal(got.positions, want.positions)
    # the store's error is the quantizer's own reconstruction error, no more
    original = memory[torch.tensor([5, 0, 3])]
    error = relative_error(original.keys.flatten(0, -2), got.keys.flatten(0, -2))
    own = relative_error(original.keys.flatten(0, -2), want.keys.flatten(0, -2))
    assert 0 < error == pytest.approx(own, rel=1e-6)
    assert store.info.quantizer is not None
    assert store.info.quantizer["fingerprint"] == quantizer.fingerprint()
    assert store.info.vector_bytes == (vectors.code_bytes, vectors.code_bytes)


def test_a_quantized_hdf5_store_reopens_by_itself_with_smaller_rows(tmp_path: Path) -> None:
    info = info_for((2, 2, 2, 4, 8), "float32")
    quantizer = fitted(MemoryQuantizer(ProductQuantizer(8, subspaces=2, bits=4)), info)
    memory = finite_memory(4, info)
    with HDF5Store(tmp_path / "q.h5", info=info, mode="w", quantizer=quantizer) as store:
        store.write([0, 1, 2, 3], memory, references_for([0, 1, 2, 3]))
        store.mark_complete()
        quantized_row = store.layout.row_bytes
    raw_row = HDF5Store(tmp_path / "raw.h5", info=info, mode="w").layout.row_bytes
    assert quantized_row < raw_row / 4  # 1 byte per 8 floats instead of 32 bytes
    reopened = HDF5Store(tmp_path / "q.h5")  # no quantizer given: the file holds it
    assert reopened.quantizer is not None
    assert reopened.quantizer.fingerprint() == quantizer.fingerprint()
    assert_same_memory(reopened.read([2, 0]), as_stored(store, memory)[torch.tensor([2, 0])])
    reopened.close()
    # a build that resumes passes its quantizer again: the same one is accepted
    HDF5Store(tmp_path / "q.h5", info=info, mode="a", quantizer=quantizer).close()
    other = fitted(MemoryQuantizer(ProductQuantizer(8, subspaces=2, bits=3)), info)
    with pytest.raises(UserError, match="written with quantizer"):
        HDF5Store(tmp_path / "q.h5", quantizer=other)
    with pytest.raises(UserError, match="raw memories"):
        HDF5Store(tmp_path / "raw.h5", mode="a", quantizer=quantizer)


def test_untrained_or_misfitting_quantizers_are_refused(tmp_path: Path) -> None:
    info = info_for((2, 2, 2, 4, 8), "float32")
    with pytest.raises(UserError, match="not trained"):
        InMemoryStore(info, quantizer=MemoryQuantizer(ProductQuantizer(8, subspaces=2, bits=3)))
    wide = MemoryQuantizer(Int8Quantizer(16))
    with pytest.raises(UserError, match=r"16-dim.*\(d_h\) 8"):
        HDF5Store(tmp_path / "q.h5", info=info, mode="w", quantizer=wide)
