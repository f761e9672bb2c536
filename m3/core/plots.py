"""Plots that people would rather see than read: training curves and evaluation bars (PNG).

matplotlib runs headless (the Agg backend); every function writes one PNG and returns it.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read Lightning's `CSVLogger` metrics file into series.

    Args:
        path: `metrics.csv`.

    Returns:
        Metric name -> `(step, value)` pairs, in step order.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(name, []).append((step, float(value)))
    return series


def plot_training_curves(metrics: str | Path, png: str | Path, *, title: str = "") -> Path:
    """Training loss per step and held-out loss, from a `metrics.csv`.

    Args:
        metrics: Lightning's `CSVLogger` file.
        png: Where to write the plot.
        title: The plot's title.

    Returns:
        The PNG's path.
    """
    plt = _pyplot()
    series = read_metrics(metrics)
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for name, style in (("train/loss_step", "-"), ("val/loss", "o-")):
        if name in series:
            steps, values = zip(*series[name], strict=True)
            axis.plot(steps, values, style, label=name.removesuffix("_step"), markersize=4)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("cross-entropy (nats / token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
    return Path(png)


def plot_bars(
    png: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    errors: Sequence[tuple[float, float]] | None = None,
    reference: float | None = None,
    reference_label: str = "",
    ylabel: str = "",
    title: str = "",
) -> Path:
    """A bar chart with optional confidence intervals and a horizontal reference line.

    Args:
        png: Where to write the plot.
        labels: One label per bar.
        values: Bar heights.
        errors: `(low, high)` interval per bar, drawn as error bars.
        reference: A value drawn as a dashed line (e.g. chance level).
        reference_label: Legend text of the line.
        ylabel: Y axis label.
        title: The plot's title.

    Returns:
        The PNG's path.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    yerr = None
    if errors is not None:
        yerr = [[v - lo for v, (lo, _) in zip(values, errors, strict=True)],
                [hi - v for v, (_, hi) in zip(values, errors, strict=True)]]  # fmt: skip
    axis.bar(list(labels), list(values), yerr=yerr, capsize=6, color="#4C72B0")
    if reference is not None:
        axis.axhline(reference, linestyle="--", color="gray", label=reference_label)
        axis.legend()
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
    return Path(png)
