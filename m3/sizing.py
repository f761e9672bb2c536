"""Storage sizes of explicit memories and the paper's cost model, from a model configuration.

Pure Python (no torch), so that `m3 size` answers at once. Everything is computed from a
`m3.model.config.Config` plus the few settings that are not part of it: bytes per stored number
(bf16: 2), bytes per vector once vector-quantized (the paper: 14 per 80-dim vector), the
training context (the config's `block_size` unless given) and the number of references.

```python
from m3.model.config import Config
from m3.sizing import format_report, size_report

report = size_report(Config.from_name("paper-2.4b"), 112_000_000)
report.sparse_bytes          # 450560 bytes per reference
report.costs.memory_write    # FLOPs to write one 128-token reference as explicit memory
print(format_report(report))
```

Storage per reference (paper §3.3):

- sparse: `L_mem · 2 · H_kv · k · d_h · bytes` (the stored memory, `Config.memory_shape`);
- quantized: `L_mem · 2 · H_kv · k · code_bytes` (every key/value vector becomes one code);
- dense, MHA-equivalent ("full"): `L · 2 · H · l_ref · d_h · bytes`, as if all query heads
  of all layers kept all tokens of the reference.

The cost model is the paper's, in FLOPs per `l_ref`-token piece of knowledge. Two
generalisations leave the paper's numbers unchanged: where the paper writes `d` for the width
of the query heads (`2d²` for the query and output projections, `d` in the attention terms),
m3 uses `q = H · d_h`, which equals `d` in the paper; and the memory-encoding pass runs
through every layer up to the last memory layer (`L_enc = max(memory_layers) + 1`, which is
`L_mem` when the memory layers are the first ones, as in the paper).

Using a piece of knowledge `u` times costs `write + u · read` in each format: parameters are
written once by training (3 passes over the tokens) and cost nothing extra per use; RAG
writes nothing and re-reads the text each time; explicit memory pays a partial forward pass
once and a little attention per use. Explicit memory is the cheapest format for
`Ew / (R − Er) < u < (P − Ew) / Er`, which for the paper is 0.494 < u < 13,388 (the
paper's "~0.5 and ~13,400").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from m3.core.errors import UserError
from m3.model.config import Config

#: References in the paper's knowledge base, as its storage totals count them (paper §3.3).
PAPER_REFERENCES = 112_000_000
#: Bytes per stored number in bf16.
BF16_BYTES = 2
#: Bytes per key/value vector after the paper's vector quantization (80-dim vectors).
PAPER_CODE_BYTES = 14

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_NUMBER = re.compile(r"[+-]?(\d[\d_,]*(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def sparse_bytes(config: Config, bytes_per_number: int = BF16_BYTES) -> int:
    """Bytes of one reference's stored memory, unquantized.

    Args:
        config: The model configuration.
        bytes_per_number: Bytes per stored number (bf16: 2).

    Returns:
        `L_mem · 2 · H_kv · k · d_h · bytes_per_number` (the paper: 450,560).
    """
    return config.memory_numel * bytes_per_number


def quantized_bytes(config: Config, code_bytes: int = PAPER_CODE_BYTES) -> int:
    """Bytes of one reference's memory when every key/value vector is vector-quantized.

    Args:
        config: The model configuration.
        code_bytes: Bytes per quantized key or value vector (the paper: 14 per 80-dim vector).

    Returns:
        `L_mem · 2 · H_kv · k · code_bytes` (the paper: 39,424).
    """
    layers, kv, heads, tokens, _ = config.memory_shape
    return layers * kv * heads * tokens * code_bytes


def dense_bytes(config: Config, bytes_per_number: int = BF16_BYTES) -> int:
    """Bytes of one reference's "full" key/values, counted as the paper does (MHA-equivalent).

    Args:
        config: The model configuration.
        bytes_per_number: Bytes per stored number (bf16: 2).

    Returns:
        `L · 2 · H · l_ref · d_h · bytes_per_number`: every query head of every layer keeps
        every token of the reference (the paper: 72,089,600).
    """
    return (
        config.n_layer
        * 2
        * config.n_head
        * config.reference_length
        * config.head_dim
        * bytes_per_number
    )


@dataclass(frozen=True)
class CostModel:
    """The paper's cost model: FLOPs to write and to read one piece of knowledge.

    A piece of knowledge is one reference of `l_ref` tokens; a read is one context chunk of
    `l_chunk` tokens using it. Using it `u` times costs `write + u · read`.

    Attributes:
        parameters_write: FLOPs to learn it into the parameters (training; reads are free).
        memory_write: FLOPs to encode it as explicit memory (a partial forward pass).
        memory_read: FLOPs for one chunk to attend to its memory.
        rag_read: FLOPs for one chunk to read it as RAG text (writing RAG text costs nothing).
    """

    parameters_write: int
    memory_write: int
    memory_read: int
    rag_read: int

    @property
    def rag_break_even(self) -> float | None:
        """Uses above which explicit memory is cheaper than RAG; None if it never is."""
        if self.rag_read <= self.memory_read:
            return None
        return self.memory_write / (self.rag_read - self.memory_read)

    @property
    def parameters_break_even(self) -> float | None:
        """Uses below which explicit memory is cheaper than parameters; None if it never is."""
        if self.parameters_write <= self.memory_write:
            return None
        return (self.parameters_write - self.memory_write) / self.memory_read

    @property
    def memory_cheapest(self) -> tuple[float, float] | None:
        """The range of uses in which explicit memory is the cheapest of the three formats.

        Returns:
            `(low, high)`: explicit memory costs less than both RAG and parameters for
            `low < u < high` uses; None when there is no such range.
        """
        low, high = self.rag_break_even, self.parameters_break_even
        if low is None or high is None or low >= high:
            return None
        return low, high


def cost_model(config: Config, train_length: int | None = None) -> CostModel:
    """The paper's cost model for a configuration, in FLOPs.

    With `d` = `n_embd`, `W` = `mlp_hidden`, `H_kv`, `d_h`, `L`, `L_mem` = number of memory
    layers, `l_ref` = `reference_length`, `l_mem` = `memory_tokens`, `l_chunk` =
    `chunk_length`, `l_train` = the training context, `n_vocab` = `vocab_size`,
    `q = H · d_h` (= `d` in the paper) and `L_enc = max(memory_layers) + 1` (= `L_mem` in the
    paper):

    - parameters: `3·2·[L(l_ref(2dq + 2d·d_h·H_kv + 3dW) + 2·l_ref·(l_train/2)·q)
      + l_ref·n_vocab·d]`
    - explicit write: `2·[L_enc(l_ref(2dq + 2d·d_h·H_kv) + l_ref²·q) + (L_enc−1)(l_ref·3dW)
      + L_mem·l_ref²·q]`
    - explicit read: `2·L_mem·2·l_chunk·l_mem·q`
    - RAG read: `2·[L(l_ref(2dq + 2d·d_h·H_kv) + 2·l_ref(l_ref/2 + l_chunk)·q)
      + (L−1)·l_ref·3dW]`

    Args:
        config: The model configuration.
        train_length: Training context `l_train`; the config's `block_size` when None.

    Returns:
        The four costs, exact integers of FLOPs.

    Raises:
        UserError: When `train_length` is not a positive integer.
    """
    l_train = config.block_size if train_length is None else train_length
    _check_positive("train_length", l_train)
    d, w = config.n_embd, config.mlp_hidden
    q = config.n_head * config.head_dim
    kv = 2 * d * config.head_dim * config.n_kv_head
    layers = config.n_layer
    memory_layers = config.memory_layers or ()
    l_mem_layers = len(memory_layers)
    l_enc = max(memory_layers) + 1 if memory_layers else 0
    l_ref, l_chunk = config.reference_length, config.chunk_length
    mlp = 3 * d * w
    # 2·l_ref·(l_train/2)·q and 2·l_ref·(l_ref/2 + l_chunk)·q, kept in integers.
    parameters = (
        3
        * 2
        * (
            layers * (l_ref * (2 * d * q + kv + mlp) + l_ref * l_train * q)
            + l_ref * config.vocab_size * d
        )
    )
    memory_write = 2 * (
        l_enc * (l_ref * (2 * d * q + kv) + l_ref**2 * q)
        + max(l_enc - 1, 0) * l_ref * mlp
        + l_mem_layers * l_ref**2 * q
    )
    memory_read = 2 * l_mem_layers * 2 * l_chunk * config.memory_tokens * q
    rag_read = 2 * (
        layers * (l_ref * (2 * d * q + kv) + l_ref * (l_ref + 2 * l_chunk) * q)
        + (layers - 1) * l_ref * mlp
    )
    return CostModel(parameters, memory_write, memory_read, rag_read)


@dataclass(frozen=True)
class SizeReport:
    """Storage sizes and costs of explicit memory for one configuration.

    Attributes:
        config: The model configuration.
        references: Number of references `N` the totals count.
        bytes_per_number: Bytes per stored number, unquantized.
        code_bytes: Bytes per key/value vector, quantized.
        dense_bytes: "Full" MHA-equivalent key/values of one reference, in bytes.
        sparse_bytes: One reference's stored memory, in bytes.
        quantized_bytes: One reference's vector-quantized memory, in bytes.
        costs: The cost model, in FLOPs.
    """

    config: Config
    references: int
    bytes_per_number: int
    code_bytes: int
    dense_bytes: int
    sparse_bytes: int
    quantized_bytes: int
    costs: CostModel

    @property
    def dense_total(self) -> int:
        """Bytes of the MHA-equivalent dense key/values of all references."""
        return self.dense_bytes * self.references

    @property
    def sparse_total(self) -> int:
        """Bytes of the memories of all references, unquantized."""
        return self.sparse_bytes * self.references

    @property
    def quantized_total(self) -> int:
        """Bytes of the memories of all references, vector-quantized."""
        return self.quantized_bytes * self.references

    @property
    def sparse_ratio(self) -> float:
        """How many times smaller sparse memories are than dense key/values (the paper: 160)."""
        return self.dense_bytes / self.sparse_bytes

    @property
    def quantized_ratio(self) -> float:
        """How many times smaller quantized memories are than dense key/values (~1830)."""
        return self.dense_bytes / self.quantized_bytes

    @property
    def quantization_ratio(self) -> float:
        """How many times smaller quantized memories are than sparse ones."""
        return self.sparse_bytes / self.quantized_bytes


def bank_sizes(recipe: Any) -> tuple[int, int | None]:
    """What a recipe's `bank` section stores: bytes per number and bytes per vector code.

    The same settings `m3 build-memory` writes with: `bank.dtype`, and the code size of
    `bank.quantizer` (built at the model's head dimension, which imports torch) or of the
    saved `bank.quantizer_file`.

    Args:
        recipe: A checked `m3.recipes.Recipe` with a `bank` section.

    Returns:
        `(bytes per number, bytes per key/value code)`; the code size is None when the
        bank is not quantized. When keys and values are coded to different sizes, their
        mean (rounded up).
    """
    bank = recipe.bank
    number = {"float32": 4, "bfloat16": 2, "float16": 2}[bank.dtype]
    if bank.quantizer is not None:
        from m3.recipes import bank_quantizer

        size = bank_quantizer(recipe).code_bytes
        return number, size
    if bank.quantizer_file is not None:
        from m3.memory.quantize import MemoryQuantizer

        saved = MemoryQuantizer.load(bank.quantizer_file)
        return number, -(-(saved.keys.code_bytes + saved.values.code_bytes) // 2)
    return number, None


def size_report(
    config: Config,
    references: int = PAPER_REFERENCES,
    *,
    bytes_per_number: int = BF16_BYTES,
    code_bytes: int = PAPER_CODE_BYTES,
    train_length: int | None = None,
) -> SizeReport:
    """Compute the storage sizes and the cost model of a configuration.

    Args:
        config: The model configuration.
        references: Number of references `N` (default: the paper's 1.12×10⁸).
        bytes_per_number: Bytes per stored number, unquantized (bf16: 2).
        code_bytes: Bytes per key/value vector, quantized (the paper: 14).
        train_length: Training context for the cost of writing parameters; the config's
            `block_size` when None.

    Returns:
        The report.

    Raises:
        UserError: When a count or a size is not a positive integer.
    """
    _check_positive("references", references)
    _check_positive("bytes_per_number", bytes_per_number)
    _check_positive("code_bytes", code_bytes)
    if not config.memory_layers:
        raise UserError(f"model config {config.name!r} has no memory layers: nothing to size")
    return SizeReport(
        config=config,
        references=references,
        bytes_per_number=bytes_per_number,
        code_bytes=code_bytes,
        dense_bytes=dense_bytes(config, bytes_per_number),
        sparse_bytes=sparse_bytes(config, bytes_per_number),
        quantized_bytes=quantized_bytes(config, code_bytes),
        costs=cost_model(config, train_length),
    )


def recipe_size_report(
    recipe: Any,
    references: int = PAPER_REFERENCES,
    *,
    bytes_per_number: int | None = None,
    code_bytes: int | None = None,
    train_length: int | None = None,
) -> SizeReport:
    """The size report of a recipe's model, storing what its `bank` section would store.

    Args:
        recipe: A checked `m3.recipes.Recipe`.
        references: Number of references `N`.
        bytes_per_number: Bytes per stored number; the bank's dtype when None (else bf16).
        code_bytes: Bytes per key/value code; the bank quantizer's when None (else 14).
        train_length: Training context of the cost model; the model's `block_size` when None.

    Returns:
        The report.
    """
    if recipe.bank is not None:  # what m3 build-memory would store
        number, code = bank_sizes(recipe)
        bytes_per_number = number if bytes_per_number is None else bytes_per_number
        code_bytes = code if code_bytes is None and code is not None else code_bytes
    return size_report(
        recipe.model.config(),
        references,
        bytes_per_number=BF16_BYTES if bytes_per_number is None else bytes_per_number,
        code_bytes=PAPER_CODE_BYTES if code_bytes is None else code_bytes,
        train_length=train_length,
    )


def parse_references(text: str) -> int:
    """Read a number of references from the command line.

    Args:
        text: A positive whole number, e.g. `112000000`, `112_000_000`, `112,000,000`,
            `1.12e8`.

    Returns:
        The number.

    Raises:
        UserError: When `text` is not a number, not whole, or not positive.
    """
    if not _NUMBER.fullmatch(text.strip()):
        raise UserError(f"N must be a number of references such as 1.12e8, got {text!r}")
    try:
        value = Decimal(text.strip().replace("_", "").replace(",", ""))
    except InvalidOperation:
        raise UserError(f"N must be a number of references, got {text!r}") from None
    if value != value.to_integral_value():
        raise UserError(f"N must be a whole number of references, got {text!r}")
    if value <= 0:
        raise UserError(f"N must be positive, got {text!r}")
    return int(value)


def format_bytes(size: int, *, binary: bool) -> str:
    """Write a size with a unit, to three significant figures.

    Args:
        size: Bytes.
        binary: Powers of 1024 (KiB, MiB, … TiB, PiB) when True, of 1000 (kB, … TB, PB)
            when False.

    Returns:
        E.g. `"45.9 TiB"` or `"50.5 TB"`.
    """
    units, base = (_BINARY_UNITS, 1024) if binary else (_DECIMAL_UNITS, 1000)
    power = 0
    while power + 1 < len(units) and size >= base ** (power + 1):
        power += 1
    if power == 0:
        return f"{size} B"
    return f"{significant(size / base**power)} {units[power]}"


def significant(value: float, digits: int = 3) -> str:
    """Write a number to a few significant figures, as the paper does.

    Args:
        value: The number.
        digits: Significant figures.

    Returns:
        E.g. `"2.24"`, `"0.308"`, `"1.44e-4"` (below 0.001), `"13,400"` (from 1,000 up,
        with thousands separators).
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) < 1e-3:
        mantissa, _, exponent = f"{value:.{digits - 1}e}".partition("e")
        return f"{mantissa}e{int(exponent)}"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if math.floor(math.log10(abs(rounded))) > math.floor(math.log10(abs(value))):
        decimals -= 1  # rounding carried into the next power of ten, e.g. 9.996 -> 10.0
        rounded = round(value, decimals)
    return f"{rounded:,.{max(decimals, 0)}f}"


def format_report(report: SizeReport, *, source: str | None = None) -> str:
    """Write a report as the small tables that `m3 size` prints.

    Args:
        report: The report.
        source: Where the configuration comes from (e.g. the recipe files), for the title.

    Returns:
        The text, ending with a newline.
    """
    config, costs = report.config, report.costs
    title = f"Explicit memory of model {config.name}"
    if source:
        title += f" ({source})"
    shape = ", ".join(str(n) for n in config.memory_shape)
    storage = [
        ("dense, MHA-equivalent", report.dense_bytes, report.dense_total),
        ("sparse", report.sparse_bytes, report.sparse_total),
        ("sparse + VQ", report.quantized_bytes, report.quantized_total),
    ]
    rows = [("storage", "per reference", "binary units", "decimal units")]
    rows += [
        (name, f"{one:,} B", format_bytes(total, binary=True), format_bytes(total, binary=False))
        for name, one, total in storage
    ]
    tflops = [
        ("parameters", costs.parameters_write, 0),
        ("explicit memory", costs.memory_write, costs.memory_read),
        ("RAG text", 0, costs.rag_read),
    ]
    cost_rows = [("format", "write", "read, per use")]
    cost_rows += [(name, significant(w / 1e12), significant(r / 1e12)) for name, w, r in tflops]
    cheapest = costs.memory_cheapest
    if cheapest is None:
        verdict = "Explicit memory is never the cheapest of the three formats for this model."
    else:
        low, high = (significant(u) for u in cheapest)
        verdict = (
            f"Explicit memory is the cheapest format for knowledge used between {low} and "
            f"{high} times."
        )
    lines = [
        title,
        f"One memory (L_mem, 2, H_kv, k, d_h) = ({shape}) = {config.memory_numel:,} numbers,",
        f"{report.bytes_per_number} B per number; VQ: {report.code_bytes} B per key/value vector.",
        "",
        f"Storage for N = {report.references:,} references",
        *_table(rows),
        f"Smaller than dense: sparse {significant(report.sparse_ratio)}×, "
        f"sparse + VQ {significant(report.quantized_ratio)}× "
        f"(VQ alone {significant(report.quantization_ratio)}×).",
        "",
        f"Cost model (the paper's), TFLOPs per {config.reference_length}-token piece of knowledge "
        f"(read by one {config.chunk_length}-token chunk)",
        *_table(cost_rows),
        verdict,
    ]
    return "\n".join(lines) + "\n"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Align rows: the first column to the left, the others to the right."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "   ".join(cells).rstrip())
    return lines


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
