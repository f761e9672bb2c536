"""Vector quantizers: codes of the promised size, round trips, error bounds, training, files.

Bit widths are reduced (dim 16, 4–6 bits) so that every quantizer trains in a fraction of a
second; `benchmarks/quantization.py` measures the paper's widths and compares with FAISS.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.core.errors import UserError
from m3.core.memories import SparseMemory
from m3.core.registry import short_name
from m3.memory.quantize import (
    CompositeQuantizer,
    Int8Quantizer,
    MemoryQuantizer,
    NoQuantizer,
    ProductQuantizer,
    QuantizedMemory,
    RawQuantizer,
    VectorQuantizer,
    kmeans,
    pack_codes,
    relative_error,
    unpack_codes,
)

DIM = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # k-means on a few thousand vectors is a stream of small ops: extra threads only contend
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(count: int = 3000, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


def anisotropic(count: int = 3000, seed: int = 0) -> torch.Tensor:
    """Variance concentrated in the first 4 of 16 dims: what a rotation and coarse codes fix."""
    scales = torch.full((DIM,), 0.1)
    scales[:4] = 3.0
    return gaussian(count, seed=seed) * scales


def small_composite(**overrides: object) -> CompositeQuantizer:
    """OPQ4_16,Residual2x6,PQ4x4 with few iterations: 2 + 2 = 4 bytes."""
    args: dict = dict(
        opq_subspaces=4,
        opq_bits=4,
        opq_iterations=5,
        coarse_bits=6,
        pq_subspaces=4,
        pq_bits=4,
        iterations=10,
    )
    return CompositeQuantizer(DIM, **{**args, **overrides})


def all_quantizers() -> list[VectorQuantizer]:
    return [
        RawQuantizer(DIM),
        RawQuantizer(DIM, dtype="float32"),
        Int8Quantizer(DIM),
        Int8Quantizer(DIM, scale_dtype="float32"),
        ProductQuantizer(DIM, subspaces=4, bits=5, iterations=5),
        ProductQuantizer(DIM, subspaces=8, bits=10, iterations=2),  # codes straddle bytes
        small_composite(),
        small_composite(coarse="residual", opq_subspaces=None),
    ]


@pytest.mark.parametrize("quantizer", all_quantizers(), ids=repr)
def test_round_trip_shapes_and_dtypes(quantizer: VectorQuantizer):
    data = gaussian(2000)
    quantizer.fit(data)
    codes = quantizer.encode(data[:37])
    assert codes.dtype == torch.uint8 and codes.shape == (37, quantizer.code_bytes)
    decoded = quantizer.decode(codes)
    assert decoded.dtype == torch.float32 and decoded.shape == (37, DIM)
    assert relative_error(data[:37], decoded) < 0.5
    assert quantizer.encode(data[:0]).shape == (0, quantizer.code_bytes)


def test_code_bytes_as_specified():
    assert RawQuantizer(80).code_bytes == 160  # bf16
    assert RawQuantizer(80, dtype="float32").code_bytes == 320
    assert Int8Quantizer(80).code_bytes == 82  # 80 int8 + fp16 scale
    assert Int8Quantizer(80, scale_dtype="float32").code_bytes == 84
    assert ProductQuantizer(80, subspaces=8, bits=10).code_bytes == 10
    assert ProductQuantizer(80, subspaces=8, bits=8).code_bytes == 8
    assert ProductQuantizer(80, subspaces=10, bits=3).code_bytes == 4  # 30 bits
    paper = CompositeQuantizer(80)  # not trained: sizes follow from the settings
    assert not paper.fitted
    assert (paper.coarse_bytes, paper.code_bytes) == (4, 14)
    assert paper.factory_string == "OPQ20_80,Residual2x14,PQ8x10"
    assert CompositeQuantizer(80, coarse="residual").code_bytes == 14
    assert CompositeQuantizer(80, coarse="residual").factory_string is None
    # paper §3.3: a paper memory (22, 2, 8, 8, 80) takes 39,424 bytes with VQ, 450,560 in bf16
    assert MemoryQuantizer(paper).memory_bytes((22, 2, 8, 8, 80)) == 39_424
    assert MemoryQuantizer(RawQuantizer(80)).memory_bytes((22, 2, 8, 8, 80)) == 450_560


def test_short_names_follow_the_registry_convention():
    names = [short_name(type(q), VectorQuantizer) for q in all_quantizers()]
    assert sorted(set(names)) == ["composite", "int8", "product", "raw"]
    assert NoQuantizer is RawQuantizer  # the name; `no` would be false in YAML


def test_no_quantizer_is_bit_exact():
    data = gaussian(50)
    exact = RawQuantizer(DIM, dtype="float32")
    assert torch.equal(exact.decode(exact.encode(data)), data)
    bf16 = RawQuantizer(DIM)
    stored = data.to(torch.bfloat16)
    codes = bf16.encode(stored)
    assert torch.equal(codes, stored.view(torch.uint8))
    assert torch.equal(bf16.decode(codes).to(torch.bfloat16), stored)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
tiny = st.floats(-(2**-20), 2**-20, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.one_of(finite, tiny, st.just(0.0)), min_size=DIM, max_size=DIM),
        min_size=1,
        max_size=6,
    ),
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
)
def test_int8_error_is_within_half_a_step(rows: list[list[float]], scale_dtype: str):
    data = torch.tensor(rows, dtype=torch.float32)
    quantizer = Int8Quantizer(DIM, scale_dtype=scale_dtype)  # type: ignore[arg-type]
    scale = quantizer.scales(data).float()
    exact = data.abs().amax(dim=1) / 127
    # the stored scale is never below max|x|/127 (nothing clips) and at most one step above
    assert (scale >= exact).all()
    step = {"float16": 2**-10, "bfloat16": 2**-7, "float32": 0.0}[scale_dtype]
    assert (scale <= exact * (1 + step) + 6e-8).all()
    error = (quantizer.decode(quantizer.encode(data)) - data).abs()
    # |x − q·s| ≤ s/2, up to float32 rounding of the product q·s
    assert (error <= scale[:, None] / 2 + data.abs() * 2**-23 + 1e-30).all()


def test_int8_zero_vectors_and_refusals():
    quantizer = Int8Quantizer(DIM)
    zeros = torch.zeros(2, DIM)
    assert torch.equal(quantizer.decode(quantizer.encode(zeros)), zeros)
    huge = torch.full((1, DIM), 1e7)
    with pytest.raises(UserError, match="float16"):
        quantizer.encode(huge)
    assert Int8Quantizer(DIM, scale_dtype="bfloat16").reconstruct(huge).isfinite().all()
    with pytest.raises(UserError, match="NaN"):
        quantizer.encode(torch.full((1, DIM), math.nan))


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(1, 16),
    fields=st.integers(1, 12),
    rows=st.integers(0, 5),
    seed=st.integers(0, 99),
)
def test_packing_round_trips_for_every_width(bits: int, fields: int, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, fields), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(fields * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, fields), codes)


def test_packing_layout_is_a_little_endian_bit_stream():
    # two 10-bit codes: 0x3FF fills bits 0-9, 0x001 sets bit 10 -> bytes ff 07 00
    packed = pack_codes(torch.tensor([[0x3FF, 0x001]]), 10)
    assert packed.tolist() == [[0xFF, 0x07, 0x00]]
    with pytest.raises(UserError, match=r"0\.\.1023"):
        pack_codes(torch.tensor([[1024]]), 10)
    with pytest.raises(UserError, match="bits"):
        pack_codes(torch.tensor([[0]]), 17)


def test_product_quantizer_error_falls_as_bits_grow():
    data = gaussian(3000)
    errors = [
        relative_error(
            data,
            ProductQuantizer(DIM, subspaces=4, bits=b, iterations=10).fit(data).reconstruct(data),
        )
        for b in (2, 4, 6)
    ]
    assert errors[0] > errors[1] > errors[2]
    more_subspaces = ProductQuantizer(DIM, subspaces=8, bits=6, iterations=10).fit(data)
    assert relative_error(data, more_subspaces.reconstruct(data)) < errors[2]


def test_product_quantizer_reconstructs_its_centroids_exactly():
    quantizer = ProductQuantizer(DIM, subspaces=4, bits=4, iterations=10).fit(gaussian(1000))
    codes = torch.randint(0, 16, (50, 4), generator=torch.Generator().manual_seed(1))
    centroids = quantizer.decode(pack_codes(codes, 4))  # vectors made of whole centroids
    assert torch.equal(quantizer.reconstruct(centroids), centroids)
    assert torch.equal(quantizer.assign(centroids), codes)


def test_kmeans_reseeds_empty_clusters():
    # 16 distinct points, each repeated: a draw of initial centroids almost surely repeats
    # one, which leaves a cluster empty; reseeding must still find all 16 points
    points = gaussian(16, seed=3) * 10
    data = points.repeat(40, 1)
    centroids = kmeans(data, 16, iterations=10, seed=0)
    distances = torch.cdist(points, centroids).min(dim=1).values
    assert distances.max() < 1e-4
    with pytest.raises(UserError, match="at least 16"):
        kmeans(data[:10], 16)


def test_composite_beats_product_quantization_of_the_same_budget_on_structured_data():
    # 4 bytes each. With variance concentrated in a few directions, the rotation and the
    # coarse codes (which see whole halves of the vector) spend bits where the variance is;
    # plain PQ spends a quarter of its bits per 4-dim subspace whatever it holds.
    data = anisotropic()
    composite = small_composite().fit(data)
    assert composite.code_bytes == 4
    product = ProductQuantizer(DIM, subspaces=4, bits=8, iterations=10).fit(data)
    composite_error = relative_error(data, composite.reconstruct(data))
    assert composite_error < 0.5 * relative_error(data, product.reconstruct(data))
    unrotated = small_composite(opq_subspaces=None).fit(data)
    assert composite_error < 0.5 * relative_error(data, unrotated.reconstruct(data))


def test_composite_error_is_sane_on_gaussian_data():
    # i.i.d. Gaussian data has no structure to exploit: there PQ of the same bytes wins
    # (32 bits against the composite's 28 used), so assert only that the composite is
    # within 2x of the Shannon bound for its 28 bits, 2^(-2·28/16) = 0.088, and above it.
    data = gaussian()
    composite = small_composite().fit(data)
    error = relative_error(data, composite.reconstruct(data))
    bound = 2 ** (-2 * 28 / DIM)
    assert bound < error < 2 * bound
    pq_part_only = small_composite(coarse_codes=0).fit(data)
    assert error < relative_error(data, pq_part_only.reconstruct(data))


def test_opq_rotation_is_orthogonal():
    quantizer = small_composite().fit(anisotropic(1000))
    rotation = quantizer.rotation
    assert rotation is not None
    assert torch.allclose(rotation @ rotation.T, torch.eye(DIM), atol=1e-5)
    assert not torch.allclose(rotation, torch.eye(DIM), atol=0.1)  # it did learn something


@pytest.mark.parametrize("quantizer", all_quantizers(), ids=repr)
def test_save_and_load_give_identical_codes(quantizer: VectorQuantizer, tmp_path):
    data = gaussian(1500)
    quantizer.fit(data, seed=3)
    path = tmp_path / "q.pt"
    quantizer.save(path)
    loaded = VectorQuantizer.load(path)
    assert type(loaded) is type(quantizer)
    assert loaded.describe() == quantizer.describe()
    assert torch.equal(loaded.encode(data), quantizer.encode(data))
    again = type(quantizer).from_bytes(quantizer.to_bytes())
    assert torch.equal(again.decode(quantizer.encode(data)), quantizer.reconstruct(data))


def test_training_is_reproducible_with_a_seed():
    data = gaussian(1500)
    first = small_composite().fit(data, seed=5).encode(data)
    assert torch.equal(small_composite().fit(data, seed=5).encode(data), first)
    assert not torch.equal(small_composite().fit(data, seed=6).encode(data), first)


def test_describe_is_json_and_rebuilds_the_settings():
    for quantizer in all_quantizers():
        description = json.loads(json.dumps(quantizer.describe()))
        rebuilt = VectorQuantizer.from_description(description)
        assert type(rebuilt) is type(quantizer)
        assert rebuilt.init_args() == quantizer.init_args()
        assert description["code_bytes"] == quantizer.code_bytes
    assert small_composite().describe()["factory"] == "OPQ4_16,Residual2x6,PQ4x4"
    with pytest.raises(UserError, match="VectorQuantizer"):
        VectorQuantizer.from_description({"class_path": "m3.core.errors.UserError"})


#: What m3 0.1 recorded for `MemoryQuantizer(Int8Quantizer(8))` (computed with its code, at
#: commit 97a0075): a stateless quantizer's fingerprint hashes its settings and class names.
M3_0_1_INT8_FINGERPRINT = "89e9acef6c64b1d7361eea09965aec3076c4d0781a18a8fb01ddcbdbcd3bd7a5"


def test_quantizers_are_recorded_by_identity_and_m3_0_1_fingerprints_still_match():
    quantizer = MemoryQuantizer(Int8Quantizer(8))
    description = quantizer.store_description()
    assert description["keys"]["class_path"] == "quantizer:int8"
    assert quantizer.fingerprint() != M3_0_1_INT8_FINGERPRINT  # the names changed...
    assert quantizer.fingerprint(legacy=True) == M3_0_1_INT8_FINGERPRINT
    assert quantizer.matches(M3_0_1_INT8_FINGERPRINT)  # ...and what 0.1 recorded still fits
    assert quantizer.matches(quantizer.fingerprint())
    assert not MemoryQuantizer(Int8Quantizer(4)).matches(M3_0_1_INT8_FINGERPRINT)
    assert not quantizer.matches(None)


def _with_class_path(path: Path, old: str, new: str) -> None:
    """Rewrite the class paths a saved quantizer file records (as an older m3 wrote them)."""
    data = torch.load(path, weights_only=True)
    for payload in (data, data.get("keys"), data.get("values")):
        if isinstance(payload, dict) and "description" in payload:
            payload["description"] = payload["description"].replace(old, new)
    torch.save(data, path)


@pytest.mark.parametrize("module", ["m3.quantize", "m3.memory.quantize"])
def test_files_naming_the_old_module_paths_load_without_a_warning(tmp_path, module):
    # files record `quantizer:<name>`; m3 0.1 recorded `m3.quantize.<class>`, and a dotted
    # path of the package `m3.memory.quantize.<class>` names the class too: all load, and
    # the old path's alias (which warns) is never imported. In a fresh interpreter, so that
    # no earlier import hides the warning.
    data = gaussian(600)
    vector = ProductQuantizer(DIM, subspaces=4, bits=4).fit(data)
    memory = MemoryQuantizer(Int8Quantizer(DIM), vector)
    vector.save(tmp_path / "vector.pt")
    memory.save(tmp_path / "memory.pt")
    assert '"quantizer:product"' in torch.load(tmp_path / "vector.pt")["description"]
    for name in ("vector.pt", "memory.pt"):
        for short, cls in (("product", "ProductQuantizer"), ("int8", "Int8Quantizer")):
            _with_class_path(tmp_path / name, f"quantizer:{short}", f"{module}.{cls}")
    saved = torch.load(tmp_path / "memory.pt", weights_only=True)
    assert f'"{module}.ProductQuantizer"' in saved["values"]["description"]
    torch.save(vector.encode(data), tmp_path / "codes.pt")
    torch.save(data, tmp_path / "data.pt")
    script = """if True:
        import sys, torch
        from pathlib import Path
        from m3.memory.quantize import MemoryQuantizer, ProductQuantizer, VectorQuantizer
        root = Path(sys.argv[1])
        data = torch.load(root / "data.pt")
        vector = VectorQuantizer.load(root / "vector.pt")
        assert type(vector) is ProductQuantizer
        assert torch.equal(vector.encode(data), torch.load(root / "codes.pt"))
        memory = MemoryQuantizer.load(root / "memory.pt")
        assert torch.equal(memory.values.encode(data), torch.load(root / "codes.pt"))
        assert "m3.quantize" not in sys.modules
    """
    subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", script, str(tmp_path)],
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_load_refuses_other_files_and_classes(tmp_path):
    path = tmp_path / "q.pt"
    Int8Quantizer(DIM).save(path)
    with pytest.raises(UserError, match="not a ProductQuantizer"):
        ProductQuantizer.load(path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a saved quantizer"):
        VectorQuantizer.load(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="no such"):
        VectorQuantizer.load(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "quantizer", [ProductQuantizer(DIM, subspaces=4, bits=4), small_composite()], ids=repr
)
def test_encode_and_decode_before_fit_are_refused(quantizer: VectorQuantizer):
    with pytest.raises(UserError, match="fit first"):
        quantizer.encode(gaussian(4))
    with pytest.raises(UserError, match="fit first"):
        quantizer.decode(torch.zeros(4, quantizer.code_bytes, dtype=torch.uint8))


@pytest.mark.parametrize("quantizer", all_quantizers(), ids=repr)
def test_wrong_dimension_names_both(quantizer: VectorQuantizer):
    quantizer.fit(gaussian(1500))
    with pytest.raises(UserError, match=r"dim 12.*dim 16"):
        quantizer.encode(gaussian(4, dim=12))
    with pytest.raises(UserError, match=r"dim 12.*dim 16"):
        type(quantizer)(**quantizer.init_args()).fit(gaussian(1500, dim=12))
    with pytest.raises(UserError, match=str(quantizer.code_bytes)):
        quantizer.decode(torch.zeros(2, quantizer.code_bytes + 1, dtype=torch.uint8))


def test_constructor_arguments_are_checked_by_name():
    cases = [
        (lambda: ProductQuantizer(30, subspaces=8), "subspaces=8"),
        (lambda: ProductQuantizer(DIM, bits=17), "bits"),
        (lambda: ProductQuantizer(0), "dim"),
        (lambda: RawQuantizer(DIM, dtype="int8"), "dtype"),  # type: ignore[arg-type]
        (lambda: Int8Quantizer(DIM, scale_dtype="float64"), "scale_dtype"),  # type: ignore[arg-type]
        (lambda: CompositeQuantizer(DIM), "opq_subspaces=20"),
        (lambda: CompositeQuantizer(DIM, opq_subspaces=4, coarse_codes=3), "coarse_codes=3"),
        (lambda: CompositeQuantizer(DIM, opq_subspaces=4, pq_subspaces=5), "pq_subspaces=5"),
        (lambda: small_composite(coarse="flat"), "coarse"),
        (lambda: small_composite(opq_iterations=0), "opq_iterations"),
    ]
    for build, name in cases:
        with pytest.raises(UserError, match=name):
            build()


def test_fit_needs_as_many_vectors_as_centroids():
    with pytest.raises(UserError, match="at least 64"):
        ProductQuantizer(DIM, subspaces=4, bits=6).fit(gaussian(50))
    with pytest.raises(UserError, match="at least 64"):
        small_composite().fit(gaussian(50))
    with pytest.raises(UserError, match="NaN"):
        ProductQuantizer(DIM, subspaces=4, bits=2).fit(torch.full((8, DIM), math.nan))


def sparse_memory(count: int = 40, seed: int = 0) -> SparseMemory:
    generator = torch.Generator().manual_seed(seed)
    shape = (count, 2, 2, 8, DIM)  # (N, L_mem, H_kv, k, d_h)
    keys = torch.randn(shape, generator=generator) * 2 + 1  # keys and values differ
    values = torch.randn(shape, generator=generator) * 0.5
    valid = torch.ones(count, 8, dtype=torch.bool)
    valid[::3, 5:] = False  # short references
    positions = torch.arange(8).expand(count, 2, 2, 8).clone()
    positions[~valid[:, None, None, :].expand_as(positions)] = -1
    return SparseMemory(keys, values, valid, positions)


def test_memory_quantizer_codes_every_key_and_value():
    memory = sparse_memory()
    quantizer = MemoryQuantizer(ProductQuantizer(DIM, subspaces=4, bits=5, iterations=5))
    assert not quantizer.shared and quantizer.values is not quantizer.keys
    quantizer.fit(memory)
    codes = quantizer.encode(memory)
    assert isinstance(codes, QuantizedMemory) and len(codes) == 40
    assert codes.keys.shape == (40, 2, 2, 8, 3) and codes.keys.dtype == torch.uint8
    assert codes.values.shape == (40, 2, 2, 8, 3)
    back = quantizer.decode(codes, dtype=torch.bfloat16)
    assert back.keys.dtype == torch.bfloat16 and back.keys.shape == memory.keys.shape
    assert torch.equal(back.valid, memory.valid) and torch.equal(back.positions, memory.positions)
    assert relative_error(memory.keys.flatten(0, 3), back.keys.float().flatten(0, 3)) < 0.2
    assert relative_error(memory.values.flatten(0, 3), back.values.float().flatten(0, 3)) < 0.3
    # separately trained: the value codebooks fit the values' smaller scale
    assert quantizer.keys.codebooks.abs().mean() > 2 * quantizer.values.codebooks.abs().mean()


def test_memory_quantizer_shared_and_saved(tmp_path):
    memory = sparse_memory()
    one = Int8Quantizer(DIM)
    shared = MemoryQuantizer(one, one).fit(memory)
    assert shared.shared and shared.describe()["shared"] is True
    separate = MemoryQuantizer(small_composite(), ProductQuantizer(DIM, subspaces=4, bits=4))
    separate.fit(memory, seed=1)
    for quantizer in (shared, separate):
        path = tmp_path / "memory.pt"
        quantizer.save(path)
        loaded = MemoryQuantizer.load(path)
        assert loaded.shared == quantizer.shared
        assert loaded.describe() == quantizer.describe()
        expected = quantizer.encode(memory)
        assert torch.equal(loaded.encode(memory).keys, expected.keys)
        assert torch.equal(loaded.encode(memory).values, expected.values)
        buffer = io.BytesIO(quantizer.to_bytes())
        assert torch.equal(MemoryQuantizer.load(buffer).encode(memory).values, expected.values)
    with pytest.raises(UserError, match="head dimension is 16"):
        MemoryQuantizer(RawQuantizer(8)).encode(memory)
