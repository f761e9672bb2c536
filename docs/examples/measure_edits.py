"""Do answers follow edited memories? The world's edits, applied to a copy of a bank.

Run on a bank of the synthetic world of `recipes/tiny/build-memory.yaml`:
`python docs/examples/measure_edits.py runs/tiny/bank runs/tiny/edits`.
"""

from __future__ import annotations

import sys

from m3.data.world import World
from m3.inference.edits import EditReport, measure_edits
from m3.inference.loading import load_inference


def measure(
    bank: str, work_dir: str, sizes: dict[str, int | float] | None = None, n_edits: int = 50
) -> EditReport:
    """Apply `n_edits` of the world's edits to a copy of the bank; ask each edit's question."""
    # the world whose knowledge base the bank holds: its seed and `World.generate` sizes
    world = World.generate(0, **(sizes or {"n_people": 240, "n_places": 80, "n_orgs": 80}))
    with load_inference(bank) as inference:  # the weights that wrote the bank, its tokenizer
        model, tokenizer = inference.model, inference.tokenizer
    report = measure_edits(
        bank,
        world.edits(n_edits),
        model=model,
        tokenizer=tokenizer,
        work_dir=work_dir,  # the edited copy goes here; the bank is left as it was
    )
    # shares answered with the new value, after and before the edits
    print(report.took_effect, report.before, report.after_score.interval)
    return report


if __name__ == "__main__":
    measure(sys.argv[1], sys.argv[2])
