"""The report of a pipeline run: one Markdown page with the figures next to it.

`write_report` gathers what the stages wrote — training curves (`curves.png`), the
evaluation table and plots, the lm-evaluation-harness table (one row per task, one column
per mode), the knowledge edits, the generation sample with its references,
the bank's storage per reference — into `<output>/report.md`, and adds the verdict on the
paper's central effect: cloze accuracy with memory against without memory (95% intervals),
and the shuffled-memory control against the no-memory level; with the generation metric,
how often greedy generation states the answer in each mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from m3.recipes import Recipe


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def memory_verdict(cloze: dict[str, dict[str, float]]) -> list[str]:
    """Sentences on the central effect, from the cloze scores of an evaluation.

    Args:
        cloze: Mode -> `ClozeScore` fields (`accuracy`, `low`, `high`), as in
            `evaluation.json`.

    Returns:
        Markdown lines: the margin of memory over no memory and whether the intervals are
        apart, and where the shuffled control falls.
    """
    lines = []
    memory, none, shuffled = cloze.get("memory"), cloze.get("none"), cloze.get("shuffled")
    if memory and none:
        margin = 100 * (memory["accuracy"] - none["accuracy"])
        apart = memory["low"] > none["high"]
        lines.append(
            f"- With memory the model answers **{memory['accuracy']:.1%}** of the questions, "
            f"without memory {none['accuracy']:.1%}: **{margin:+.1f} points**; the 95% "
            f"intervals {'do not overlap' if apart else 'overlap'}."
        )
    if shuffled and none:
        inside = none["low"] <= shuffled["accuracy"] <= none["high"]
        lines.append(
            f"- Negative control, memories shuffled across questions: {shuffled['accuracy']:.1%}"
            f" ({'within' if inside else 'outside'} the no-memory interval "
            f"{none['low']:.1%} – {none['high']:.1%})."
        )
    return lines


def generation_verdict(generation: dict[str, dict[str, float]]) -> list[str]:
    """A sentence on facts in generated text, next to the cloze verdict.

    Args:
        generation: Mode -> `GenerationScore` fields (`exact`, `exact_low`, `exact_high`,
            `contains`), as in `evaluation.json`'s `generation`.

    Returns:
        Markdown lines: how often greedy generation states the answer first in each mode,
        and memory's margin over no memory and its ratio to RAG.
    """
    if not generation:
        return []
    shown = ", ".join(
        f"{mode} {s['exact']:.1%} ({s['exact_low']:.1%} – {s['exact_high']:.1%})"
        for mode, s in generation.items()
    )
    line = f"- Greedy generation states the answer first (exact match): {shown}"
    memory, none, rag = (generation.get(m) for m in ("memory", "none", "rag"))
    if memory and none:
        line += f"; memory − none **{100 * (memory['exact'] - none['exact']):+.1f} points**"
    if memory and rag and rag["exact"] > 0:
        line += f", memory ÷ RAG **{memory['exact'] / rag['exact']:.2f}**"
    return [line + "."]


def _storage(stage: Recipe, folder: Path) -> tuple[list[str], Path]:
    """Storage per reference of a bank: measured on disk, and the sizing model's figures."""
    from m3.core.plots import plot_bars
    from m3.sizing import dense_bytes, sparse_bytes

    manifest = _read_json(folder / "manifest.json") or {}
    references = int(manifest.get("references", 0) or 0)
    on_disk = sum(
        f.stat().st_size for f in folder.iterdir() if f.suffix in (".h5", ".hdf5") and f.is_file()
    )
    config = stage.model.config()
    rows = {
        "dense K/V (MHA-equivalent, bf16)": dense_bytes(config),
        "sparse memory (bf16)": sparse_bytes(config),
    }
    if references:
        rows["this bank on disk"] = on_disk // references
    lines = [
        "| per reference | bytes |",
        "|---|---:|",
        *(f"| {name} | {size:,} |" for name, size in rows.items()),
        "",
        f"{references:,} references in the bank; memory shape {config.memory_shape} "
        "(layers, k/v, heads, tokens, head dim).",
    ]
    png = plot_bars(
        folder.parent / "storage.png",
        list(rows),
        [size / 1024 for size in rows.values()],
        ylabel="KiB per reference",
        title="Storage per reference",
    )
    return lines, png


def write_report(
    recipe: Recipe, stages: list[tuple[str, Recipe]], done: dict[str, dict[str, Any]]
) -> Path:
    """Write `<output>/report.md` from the outputs of a pipeline's stages.

    Args:
        recipe: The pipeline recipe.
        stages: `(name, recipe)` of each stage (`m3.recipes.stage_recipes`).
        done: Stage name -> what the pipeline recorded (`seconds`, `stage`).

    Returns:
        The report's path.
    """
    output = Path(recipe.output)

    def image(path: Path, alt: str) -> str:
        return f"![{alt}]({os.path.relpath(path, output)})"

    total = sum(d.get("seconds", 0.0) for d in done.values())
    lines = [f"# {recipe.description or 'm3 pipeline'}", ""]
    lines += ["| stage | runs | seconds |", "|---|---|---:|"]
    lines += [
        f"| {name} | {stage.stage} | {done.get(name, {}).get('seconds', float('nan')):.0f} |"
        for name, stage in stages
    ]
    lines += [f"| **total** | | **{total:.0f}** |", ""]
    for name, stage in stages:
        folder = Path(stage.output)
        if stage.stage in ("warmup", "continual") and (folder / "curves.png").is_file():
            lines += [f"## Training: {name}", "", image(folder / "curves.png", name), ""]
        elif stage.stage == "evaluate":
            results = _read_json(folder / "evaluation.json") or {}
            lines += [f"## Evaluation: {name}", ""]
            lines += [*memory_verdict(results.get("cloze", {}))]
            lines += [*generation_verdict(results.get("generation", {})), ""]
            if (folder / "evaluation.md").is_file():
                lines += [(folder / "evaluation.md").read_text(), ""]
            for png in ("cloze.png", "generation.png", "heldout.png"):
                if (folder / png).is_file():
                    lines += [image(folder / png, png[:-4]), ""]
        elif stage.stage == "build_memory" and (folder / "manifest.json").is_file():
            table, png = _storage(stage, folder)
            lines += [
                f"## Storage: {name}",
                "",
                *table,
                "",
                image(png, "storage per reference"),
                "",
            ]
        elif stage.stage == "lm_eval" and (folder / "lm_eval.md").is_file():
            lines += [f"## lm-evaluation-harness: {name}", "", (folder / "lm_eval.md").read_text()]
        elif stage.stage in ("edit", "generate"):
            for markdown in sorted(folder.glob("*.md")):
                lines += [markdown.read_text(), ""]
            for png in sorted(folder.glob("*.png")):
                lines += [image(png, png.stem), ""]
    report = output / "report.md"
    report.write_text("\n".join(lines))
    return report
