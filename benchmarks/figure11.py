"""The paper's Figure 11 at small scale: when should memory join training?

Four runs of the quickstart pipeline (`recipes/quickstart.yaml`, or `--recipe`, with the
same `key=value` overrides), the same world, equal total steps:

- **warmup → continual with memory** (the paper's recipe);
- **warmup → more training without memory**, on the same knowledge-heavy text;
- **memory from step 0**: continual training from random weights for all the steps;
- **no memory from step 0**, on the knowledge-heavy text only (in-domain from the start).

Each run then encodes the knowledge base with its own weights and runs the quickstart's
evaluation. The table gives the held-out loss on the held-out entities' text (paper protocol
for the runs with memory, no memory for the others), cloze accuracy likewise, and the last
validation loss on the held-out split of the training text; `figure11.png` plots those
validation curves over the optimiser steps of the whole run.

    OMP_NUM_THREADS=2 python benchmarks/figure11.py [--warmup-steps 400] \\
        [--continual-steps 1320] [--out benchmarks/results] [key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

from m3.core import registry
from m3.core.plots import _pyplot
from m3.pipeline import run_pipeline
from m3.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]

#: name -> (warmup stage first, memory in the second stage)
RUNS = {
    "warmup → continual with memory": (True, True),
    "warmup → more training, no memory": (True, False),
    "memory from step 0": (False, True),
    "no memory from step 0 (in-domain)": (False, False),
}


def run_recipe(base: dict, *, warmup: bool, memory: bool, steps: tuple[int, int]) -> dict:
    """One run's pipeline: data, [warmup], train, bank, evaluate — from the quickstart's."""
    stages = base["stages"]
    # the quickstart's first continual stage (one-chunk sequences, from the warmup weights):
    # its second one starts from the first one's weights, which these runs do not have
    train = json.loads(json.dumps(stages["reading"]))  # a deep copy
    train["trainer"]["max_steps"] = steps[1] if warmup else sum(steps)
    if not warmup:
        train["training"]["init_weights"] = "random" if memory else None
    if not memory:
        train["stage"] = "warmup"
        train["data"].pop("knowledge", None)
    weights = {"init_weights": f"{base['output']}/train/model.pt"}
    run = {"data": stages["data"]}
    if warmup:
        run["warmup"] = {**stages["warmup"], "trainer": {"max_steps": steps[0]}}
    run["train"] = train
    run["bank"] = {**stages["bank"], "training": weights}
    evaluation = {**stages["evaluate"]["evaluation"]}
    if not memory:  # read as it was trained: warmup mode, not memory mode with no memories
        evaluation["without_memory"] = "warmup"
    run["evaluate"] = {**stages["evaluate"], "training": weights, "evaluation": evaluation}
    return {**base, "stages": run}


def validation_curve(folder: Path, offset: int) -> list[tuple[int, float]]:
    """`(step, val/loss)` points of a training stage's `metrics.csv`."""
    with open(folder / "logs" / "metrics.csv", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/loss")]
    return [(offset + int(row["step"]) + 1, float(row["val/loss"])) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--warmup-steps", type=int, default=400)
    parser.add_argument("--continual-steps", type=int, default=1320)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = (args.warmup_steps, args.continual_steps)
    results = {}
    for name, (warmup, memory) in RUNS.items():
        folder = out / "figure11" / name.split(" (")[0].replace(" → ", "-").replace(" ", "-")
        recipe_file = folder.with_suffix(".yaml")
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        with registry.input_files_unchecked():  # the data stage writes them
            base = load_recipe([args.recipe], [*args.overrides, f"output={folder}"]).to_dict()
            recipe = run_recipe(base, warmup=warmup, memory=memory, steps=steps)
            recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
            checked = load_recipe([recipe_file])
        run_pipeline(checked, overwrite=True)
        evaluation = json.loads((folder / "evaluate" / "evaluation.json").read_text())
        mode = "memory" if memory else "none"
        heldout = evaluation["heldout"]["paper"][mode]["loss"]
        cloze = evaluation["cloze"][mode]["accuracy"]
        curve = validation_curve(folder / "train", steps[0] if warmup else 0)
        stages = json.loads((folder / "pipeline.json").read_text())["stages"].values()
        results[name] = (heldout, cloze, curve, sum(stage["seconds"] for stage in stages))

    print(f"\n{args.recipe} {' '.join(args.overrides)}")
    print(f"{steps[0]} warmup + {steps[1]} continual steps (or {sum(steps)} from step 0)\n")
    print(f"{'run':<36}{'held-out loss':>14}{'cloze':>8}{'val loss':>10}{'stages':>8}")
    for name, (heldout, cloze, curve, seconds) in results.items():
        print(f"{name:<36}{heldout:>14.3f}{cloze:>8.1%}{curve[-1][1]:>10.3f}{seconds:>7.0f}s")
    best = min(results, key=lambda n: results[n][0])
    print(f"\nlowest held-out loss: {best} (paper: warmup → continual with memory)")

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for name, (_, _, curve, _) in results.items():
        axis.plot(*zip(*curve, strict=True), "o-", label=name, markersize=3)
    axis.set_xlabel("optimiser step (warmup included)")
    axis.set_ylabel("validation loss, knowledge-heavy text")
    axis.set_title("When should memory join training? (cf. paper Fig. 11)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "figure11.png", dpi=120)
    print(f"plot: {out / 'figure11.png'}")


if __name__ == "__main__":
    main()
