"""m3.sizing and `m3 size`: the paper's storage figures and cost model, and other configs.

The formulas are written out again here, from the paper (§3.3 and its cost model), rather
than by calling the helpers under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.cli import main
from m3.core.errors import UserError
from m3.model.config import Config
from m3.recipes import RECIPES_DIR, load_recipe
from m3.sizing import (
    PAPER_REFERENCES,
    CostModel,
    cost_model,
    dense_bytes,
    format_bytes,
    format_report,
    parse_references,
    quantized_bytes,
    significant,
    size_report,
    sparse_bytes,
)

ROOT = RECIPES_DIR.parent
PAPER = "recipes/paper-2.4b/base.yaml"
TINY = "recipes/tiny/base.yaml"


def paper_config() -> Config:
    return load_recipe(str(ROOT / PAPER)).model.config()


def run_in_root(*command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


# --- the paper's figures -----------------------------------------------------------------------


def test_paper_bytes_per_reference() -> None:
    config = paper_config()
    assert sparse_bytes(config) == 22 * 2 * 8 * 8 * 80 * 2 == 450_560
    assert quantized_bytes(config) == 22 * 2 * 8 * 8 * 14 == 39_424
    assert dense_bytes(config) == 44 * 2 * 40 * 128 * 80 * 2 == 72_089_600


def test_paper_totals_in_binary_and_decimal_units() -> None:
    report = size_report(paper_config(), 112_000_000)
    assert report.references == PAPER_REFERENCES
    assert format_bytes(report.sparse_total, binary=True) == "45.9 TiB"
    assert format_bytes(report.quantized_total, binary=True) == "4.02 TiB"
    assert format_bytes(report.dense_total, binary=True) == "7.17 PiB"
    assert format_bytes(report.sparse_total, binary=False) == "50.5 TB"
    assert report.sparse_ratio == 160  # 2× layers, 5× heads, 16× tokens
    assert report.quantized_ratio == pytest.approx(1828.57, abs=0.01)
    assert significant(report.quantized_ratio) == "1,830"
    # the paper's sparse bank in decimal units, 50.3 TB, counts 14.3B tokens / 128 =
    # 111,718,750 references, which gives 45.8 TiB rather than the paper's 45.9.
    spec_count = size_report(paper_config(), 14_300_000_000 // 128)
    assert format_bytes(spec_count.sparse_total, binary=False) == "50.3 TB"
    assert format_bytes(spec_count.sparse_total, binary=True) == "45.8 TiB"


def test_paper_cost_model() -> None:
    costs = cost_model(paper_config())
    tflops = [
        costs.parameters_write / 1e12,
        costs.memory_write / 1e12,
        costs.memory_read / 1e12,
        costs.rag_read / 1e12,
    ]
    assert [significant(t) for t in tflops] == ["2.24", "0.308", "1.44e-4", "0.624"]
    assert tflops == pytest.approx([2.2385, 0.30818, 1.4418e-4, 0.62422], rel=1e-4)


def test_paper_break_even_is_about_half_a_use_and_13400_uses() -> None:
    costs = cost_model(paper_config())
    low, high = costs.memory_cheapest or (0.0, 0.0)
    assert round(low, 1) == 0.5 and round(high, -2) == 13_400
    assert low == pytest.approx(0.4938, abs=1e-4)
    assert high == pytest.approx(13_388.36, abs=0.01)


# --- any configuration against the formulas, written out here ---------------------------------


def spec_costs(c: Config, l_train: int) -> tuple[Fraction, Fraction, Fraction, Fraction]:
    """The paper's cost model as written.

    Valid when n_head·head_dim = n_embd and memory layers come first.
    """
    d, w, h_kv, d_h = c.n_embd, c.mlp_hidden, c.n_kv_head, c.head_dim
    big_l, l_mem_layers = c.n_layer, len(c.memory_layers or ())
    l_ref, l_mem, l_chunk, n_vocab = (
        c.reference_length,
        c.memory_tokens,
        c.chunk_length,
        c.vocab_size,
    )
    half_train, half_ref = Fraction(l_train, 2), Fraction(l_ref, 2)
    params = (
        3
        * 2
        * (
            big_l
            * (l_ref * (2 * d**2 + 2 * d * d_h * h_kv + 3 * d * w) + 2 * l_ref * half_train * d)
            + l_ref * n_vocab * d
        )
    )
    write = 2 * (
        l_mem_layers * (l_ref * (2 * d**2 + 2 * d * d_h * h_kv) + l_ref**2 * d)
        + (l_mem_layers - 1) * (l_ref * 3 * d * w)
        + l_mem_layers * l_ref**2 * d
    )
    read = 2 * l_mem_layers * 2 * l_chunk * l_mem * d
    rag = 2 * (
        big_l * (l_ref * (2 * d**2 + 2 * d * d_h * h_kv) + 2 * l_ref * (half_ref + l_chunk) * d)
        + (big_l - 1) * l_ref * 3 * d * w
    )
    return Fraction(params), Fraction(write), Fraction(read), Fraction(rag)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    n_kv_head = draw(st.integers(1, 4))
    n_head = n_kv_head * draw(st.integers(1, 4))
    head_dim = 2 * draw(st.integers(1, 24))
    n_layer = draw(st.integers(1, 12))
    return Config(
        vocab_size=draw(st.integers(1, 70_000)),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
        n_embd=n_head * head_dim,
        mlp_hidden=draw(st.integers(1, 1024)),
        block_size=draw(st.integers(1, 4096)),
        memory_layers=tuple(range(draw(st.integers(1, n_layer)))),
        memory_tokens=draw(st.integers(1, 16)),
        chunk_length=draw(st.integers(1, 128)),
        reference_length=draw(st.integers(1, 257)),
    )


@settings(max_examples=200, deadline=None)
@given(
    config=configs(),
    n=st.integers(1, 10**12),
    bytes_per_number=st.integers(1, 4),
    code_bytes=st.integers(1, 32),
)
def test_any_config_against_the_formulas(
    config: Config, n: int, bytes_per_number: int, code_bytes: int
) -> None:
    report = size_report(config, n, bytes_per_number=bytes_per_number, code_bytes=code_bytes)
    l_mem_layers = len(config.memory_layers or ())
    sparse = l_mem_layers * 2 * config.n_kv_head * config.memory_tokens * config.head_dim
    assert report.sparse_bytes == sparse * bytes_per_number
    assert (
        report.quantized_bytes
        == l_mem_layers * 2 * config.n_kv_head * config.memory_tokens * code_bytes
    )
    dense = config.n_layer * 2 * config.n_head * config.reference_length * config.head_dim
    assert report.dense_bytes == dense * bytes_per_number
    assert report.sparse_total == sparse * bytes_per_number * n
    assert report.quantized_total == report.quantized_bytes * n
    assert report.dense_total == dense * bytes_per_number * n

    costs = report.costs
    assert (
        costs.parameters_write,
        costs.memory_write,
        costs.memory_read,
        costs.rag_read,
    ) == spec_costs(config, config.block_size)


@settings(max_examples=200, deadline=None)
@given(config=configs())
def test_break_even_bounds_where_memory_is_cheapest(config: Config) -> None:
    p, ew, er, r = spec_costs(config, config.block_size)

    def cheapest(u: Fraction) -> bool:
        return ew + u * er < min(p, u * r)

    low_t = ew / (r - er) if r > er else None  # memory beats RAG above this many uses
    high_t = (p - ew) / er if p > ew else None  # memory beats parameters below
    found = cost_model(config).memory_cheapest
    if low_t is None or high_t is None or low_t >= high_t:
        assert found is None
        return
    assert found is not None
    low, high = (Fraction(x) for x in found)
    assert abs(low - low_t) <= 1e-9 * low_t and abs(high - high_t) <= 1e-9 * high_t
    assert cheapest((low + high) / 2)
    assert not cheapest(low * Fraction(999, 1000))
    assert not cheapest(high * Fraction(1001, 1000))


def test_wider_query_heads_and_middle_memory_layers() -> None:
    # n_head·head_dim (=96) ≠ n_embd (=64), and memory layers 2..3 of 6: q = 96, L_enc = 4.
    c = Config(
        n_layer=6,
        n_head=6,
        n_kv_head=2,
        head_dim=16,
        n_embd=64,
        mlp_hidden=100,
        block_size=300,
        memory_layers=(2, 3),
        memory_tokens=4,
        chunk_length=32,
        reference_length=50,
        vocab_size=1000,
    )
    d, q, w, kv = 64, 96, 100, 2 * 64 * 16 * 2
    params = 6 * (6 * (50 * (2 * d * q + kv + 3 * d * w) + 50 * 300 * q) + 50 * 1000 * d)
    write = 2 * (4 * (50 * (2 * d * q + kv) + 50 * 50 * q) + 3 * 50 * 3 * d * w + 2 * 50 * 50 * q)
    read = 2 * 2 * 2 * 32 * 4 * q
    rag = 2 * (6 * (50 * (2 * d * q + kv) + 50 * (50 + 64) * q) + 5 * 50 * 3 * d * w)
    assert cost_model(c) == CostModel(params, write, read, rag)
    assert dense_bytes(c) == 6 * 2 * 6 * 50 * 16 * 2
    # A longer training context makes only parameters dearer.
    longer = cost_model(c, train_length=600)
    assert longer.parameters_write == params + 6 * 6 * 50 * 300 * q
    assert (longer.memory_write, longer.rag_read) == (write, rag)


def test_bad_settings_are_user_errors() -> None:
    config = Config.from_name("tiny")
    for kwargs in ({"bytes_per_number": 0}, {"code_bytes": -1}, {"train_length": 0}):
        with pytest.raises(UserError, match="must be a positive integer"):
            size_report(config, 10, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="references must be a positive integer"):
        size_report(config, 0)


# --- formatting and parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2.2385, "2.24"),
        (0.30818, "0.308"),
        (1.4418e-4, "1.44e-4"),
        (0.4196, "0.420"),
        (160.0, "160"),
        (9.996, "10.0"),
        (13_388.4, "13,400"),
        (0.0, "0"),
    ],
)
def test_significant(value: float, text: str) -> None:
    assert significant(value) == text


@pytest.mark.parametrize(
    ("size", "binary", "text"),
    [
        (1000, True, "1000 B"),
        (1024, True, "1.00 KiB"),
        (1000, False, "1.00 kB"),
        (1536 * 2**20, True, "1.50 GiB"),
        (1536 * 2**20, False, "1.61 GB"),
        (5 * 2**60, True, "5.00 EiB"),
    ],
)
def test_format_bytes(size: int, binary: bool, text: str) -> None:
    assert format_bytes(size, binary=binary) == text


@pytest.mark.parametrize(
    ("text", "n"),
    [("112000000", 112_000_000), ("1.12e8", 112_000_000), ("112_000_000", 112_000_000),
     ("112,000,000", 112_000_000), ("1E3", 1000), ("+7", 7)],
)  # fmt: skip
def test_parse_references(text: str, n: int) -> None:
    assert parse_references(text) == n


@pytest.mark.parametrize(
    ("text", "message"),
    [("0", "positive"), ("-5", "positive"), ("1.5", "whole number"), ("1.12e-8", "whole number"),
     ("abc", "such as 1.12e8"), ("nan", "such as 1.12e8"), ("", "such as 1.12e8")],
)  # fmt: skip
def test_parse_references_rejects(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_references(text)


# --- m3 size -----------------------------------------------------------------------------------

PAPER_NUMBERS = [
    "N = 112,000,000 references",
    "450,560 B",
    "39,424 B",
    "72,089,600 B",
    "45.9 TiB",
    "4.02 TiB",
    "7.17 PiB",
    "50.5 TB",
    "sparse 160×",
    "sparse + VQ 1,830×",
    "2.24",
    "0.308",
    "1.44e-4",
    "0.624",
    "between 0.494 and 13,400 times",
]


def test_size_prints_the_paper_figures(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["size", PAPER, "1.12e8"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for number in PAPER_NUMBERS:
        assert number in out
    assert out == format_report(size_report(paper_config(), 112_000_000), source=PAPER)
    # N defaults to the paper's, and may come after the overrides.
    assert main(["size", PAPER]) == 0
    assert capsys.readouterr().out == out
    assert main(["size", PAPER, "seed=1", "112000000"]) == 0
    assert capsys.readouterr().out == out


def test_size_options_and_overrides(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    argv = ["size", "--bytes-per-number", "4", "--code-bytes", "8", TINY, "1000"]
    assert main([*argv, "model.n_layer=6", "model.memory_layers=[0,1,2]"]) == 0
    out = capsys.readouterr().out
    config = Config.from_name("tiny", n_layer=6, memory_layers=(0, 1, 2))
    expected = size_report(config, 1000, bytes_per_number=4, code_bytes=8)
    assert out == format_report(expected, source=TINY)
    assert f"{3 * 2 * 2 * 8 * 16 * 4:,} B" in out and f"{3 * 2 * 2 * 8 * 8:,} B" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([PAPER, "0"], "N must be positive"),
        ([PAPER, "-3"], "N must be positive"),
        ([PAPER, "2.5"], "N must be a whole number"),
        ([PAPER, "12abc"], "N must be a number"),
        ([PAPER, "10", "20"], "give N, the number of references, once"),
        (["--code-bytes", "0", PAPER], "code_bytes must be a positive integer"),
        (["100"], "name at least one recipe file"),
    ],
)
def test_size_user_errors(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["size", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("m3: error: ") and message in err
    assert "Traceback" not in err


def test_size_entry_point_loads_no_torch() -> None:
    # -X importtime lists every module the real entry point imports, on stderr.
    result = run_in_root("-X", "importtime", "-m", "m3", "size", PAPER, "1.12e8")
    assert result.returncode == 0, result.stderr
    for number in PAPER_NUMBERS:
        assert number in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "m3.sizing" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "lightning")}

    code = (
        "import sys; from m3.cli import main; "
        f"assert main(['size', {PAPER!r}, '1.12e8']) == 0; "
        "print('loaded:', sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    result = run_in_root("-c", code)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout


def test_size_entry_point_bad_n_exits_2_without_traceback() -> None:
    result = run_in_root("-m", "m3", "size", PAPER, "0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "m3: error: N must be positive, got '0'\n"


def test_costs_page_shows_the_real_output() -> None:
    text = (ROOT / "docs" / "concepts" / "costs.md").read_text(encoding="utf-8")
    blocks = [block.split("\n```", 1)[0] for block in text.split("```console\n")[1:]]
    assert blocks, "docs/concepts/costs.md shows no console block"
    for block in blocks:
        command, _, expected = block.partition("\n")
        assert command.startswith("$ m3 size ")
        result = run_in_root("-m", "m3", *command.split()[2:])
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n"
