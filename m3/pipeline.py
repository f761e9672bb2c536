"""Pipelines: run a recipe's stages in order, skipping the ones already done (`m3 run`).

A pipeline recipe (`stage: pipeline`) lists `stages`, each with a name and the recipe keys
that make it one stage (`m3.recipes.stage_recipes`). Each stage writes to its own folder,
`<output>/<name>` by default, and one of these runs it:

| stage | runs |
|---|---|
| `world` | `write_world`: the synthetic world's files, general text, the tokenizer |
| `warmup`, `continual` | `m3.training.fit.fit` |
| `build_memory` | `m3.bank.build.build_memory` |
| `evaluate` | `m3.inference.evaluate.evaluate_recipe` |
| `generate` | `generate_sample`: a generation sample with its references, decode speed |
| `edit` | `measure_edits_stage`: knowledge edits on a copy of the bank |
| `lm_eval` | `m3.inference.harness_runs.lm_eval_recipe`: lm-evaluation-harness tasks per mode |

**Skipping.** A stage is done when its folder is complete for its recipe *and* every stage
before it is unchanged: each stage's fingerprint chains its recipe's fingerprint with the
previous stage's, and `<output>/pipeline.json` records the fingerprints of the stages that
finished. Re-running after an interruption continues with the first stage not done; a stage
whose inputs changed runs again (its stale folder is replaced).

**Ownership.** `pipeline.json` also records the fingerprint of the whole recipe; a run folder
written by another recipe is refused unless `overwrite` is given, and then only the stages
whose fingerprints changed are run again.

```python
from m3.pipeline import run_pipeline
from m3.recipes import load_recipe

report = run_pipeline(load_recipe("recipes/quickstart.yaml"))   # <output>/report.md
```
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m3.core import registry
from m3.core.errors import UserError
from m3.core.registry import Problem
from m3.core.runs import RunFolder, recipe_fingerprint
from m3.recipes import Recipe, RecipeError, WorldSection, build, stage_recipes, validate

#: The file in a pipeline's output folder that records what finished.
STATE = "pipeline.json"


def write_world(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """Write the synthetic world, the warmup stage's general text and the tokenizer (`world`).

    Files in the output folder: the world's (`World.write`: `kb.jsonl`, `train.jsonl`,
    `heldout.jsonl`, `cloze.jsonl`, `edits.jsonl`, `entities.jsonl`, `world.json`), then
    `general.jsonl` (a second world's open-book text, `World.open_book_documents`, and
    standard-library English: text without this world's facts) and `corpus.txt` (all the
    text, one document per paragraph, for training a tokenizer). A recipe tokenizer is built
    once, so that one that trains itself on `corpus.txt` (`HFTokenizer` with `train_files`
    and `cache`) is trained here and reused by the later stages.

    Args:
        recipe: A checked recipe with `stage: world` (its `world:` section, or the defaults).
        overwrite: Replace a folder that another recipe wrote.

    Returns:
        The output folder.
    """
    from m3.data.sources import StdlibSource
    from m3.data.world import World

    spec = recipe.world or WorldSection()
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        return run.path
    run.claim(overwrite=overwrite)
    sizes = {"n_people": spec.n_people, "n_places": spec.n_places, "n_orgs": spec.n_orgs}
    world = World.generate(spec.seed, **sizes)
    paths = world.write(run.path, n_questions=spec.n_questions, n_edits=spec.n_edits)
    general = []
    if spec.background_seed is not None:
        background = World.generate(spec.background_seed, **sizes)
        general += background.open_book_documents()
    if spec.stdlib_chars:
        general += StdlibSource(max_chars=spec.stdlib_chars).documents()
    with open(run.path / "general.jsonl", "w", encoding="utf-8") as handle:
        for document in general:
            handle.write(json.dumps({"id": document.id, "text": document.text}) + "\n")
    texts = [d.text for d in general + world.training_documents() + world.knowledge_base()]
    (run.path / "corpus.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    if recipe.tokenizer is not None:
        build(recipe, "tokenizer")
    run.finish(
        {
            "files": sorted(p.name for p in paths.values()),
            "general_documents": len(general),
            "summary": world.summary(),
        }
    )
    return run.path


def _evaluation_file(recipe: Recipe, key: str) -> list:
    from m3.data.world import read_cloze, read_edits

    spec = recipe.evaluation
    path = None if spec is None else getattr(spec, key)
    if path is None:
        raise UserError(f"evaluation.{key}: this stage needs the {key} file (JSON Lines)")
    if key == "edits":
        return read_edits(path)[: spec.n_edits]  # type: ignore[union-attr]
    return read_cloze(path)[: spec.n_questions]  # type: ignore[union-attr]


def measure_edits_stage(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """Apply knowledge edits to a copy of the bank and measure the answers (`edit` stage).

    The edits come from `evaluation.edits` (`World.write`'s `edits.jsonl`); each replaces
    knowledge-base documents, and its cloze question's correct option is the new value.
    Writes `edits.json` and `edits.md`; the edited copy of the bank stays in the folder.

    Args:
        recipe: A checked recipe with `stage: edit`, `retrieval.bank` and the weights.
        overwrite: Replace a folder that another recipe wrote.

    Returns:
        The output folder.
    """
    from m3.inference.edits import measure_edits
    from m3.inference.loading import load_inference

    edits = _evaluation_file(recipe, "edits")
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        return run.path
    run.claim(overwrite=overwrite)
    with load_inference(recipe) as inference:
        retriever = inference.retriever
        model, tokenizer = inference.model, inference.tokenizer
        k, threshold = retriever.k, retriever.threshold
    report = measure_edits(
        recipe.retrieval.bank, edits,  # type: ignore[union-attr]
        model=model, tokenizer=tokenizer, work_dir=run.path, k=k, threshold=threshold,
        chunker=build(recipe, "chunker"),
    )  # fmt: skip
    after, before = report.after_score, report.before_score
    results = {
        "edits": report.n,
        "answered_new_value_before": report.before,
        "answered_new_value_after": report.took_effect,
        "after_interval": [after.low, after.high],
        "before_interval": [before.low, before.high],
        "chance": after.chance,
    }
    (run.path / "edits.json").write_text(json.dumps(results, indent=2) + "\n")
    (run.path / "edits.md").write_text(
        "## Knowledge editing\n\n"
        f"{report.n} facts of held-out entities changed in a copy of the bank (documents "
        "re-encoded, store and index updated; no retraining). Share of the edited facts' "
        "questions answered with the **new** value, with memory:\n\n"
        "| bank | new value chosen | 95% interval |\n|---|---:|---:|\n"
        f"| before the edits | {report.before:.1%} | {before.low:.1%} – {before.high:.1%} |\n"
        f"| after the edits | **{report.took_effect:.1%}** | {after.low:.1%} – {after.high:.1%} |\n"
    )
    run.finish({"edits": results})
    return run.path


def generate_sample(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """A short generation sample with the references it read, and decoding speed (`generate`).

    Prompts are the first cloze questions' prompts (`evaluation.cloze`): each is continued
    with memory and without; the memory sample lists the references each chunk read.
    Decoding speed is measured on a batch of 8 copies of the prompts, with and without
    memory, `generation.max_new_tokens` tokens each (EOS ignored). Writes `generation.json`,
    `generation.md` and `throughput.png`.

    Args:
        recipe: A checked recipe with `stage: generate`, `retrieval.bank` and the weights.
        overwrite: Replace a folder that another recipe wrote.

    Returns:
        The output folder.
    """
    import time as clock

    from m3.core.plots import plot_bars
    from m3.inference.generate import generate
    from m3.inference.loading import load_inference
    from m3.recipes import GenerationSection

    prompts = [q.prompt for q in _evaluation_file(recipe, "cloze")[:3]]
    settings = recipe.generation or GenerationSection()
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        return run.path
    run.claim(overwrite=overwrite)
    lines = ["## Generation sample", ""]
    speed: dict[str, float] = {}
    with load_inference(recipe) as inference:
        for mode in ("memory", "none"):
            out = generate(inference, prompts, max_new_tokens=settings.max_new_tokens, mode=mode)
            for n, prompt in enumerate(prompts):
                shown = " ⏎ ".join(out.texts[n].strip().splitlines())
                lines += [f"- *{mode}*: {prompt} **{shown}**", ""]
                if mode == "memory":
                    for chunk in out.provenance[n]:
                        lines.append(f"- chunk {chunk.chunk} read references {chunk.ids}:")
                        lines += [f"    - {' '.join(t.split())}" for t in chunk.texts]
                    lines.append("")
        batch = prompts * (8 // len(prompts) + 1)
        for mode in ("memory", "none"):
            start = clock.perf_counter()
            out = generate(
                inference, batch[:8], max_new_tokens=settings.max_new_tokens, mode=mode,
                ignore_eos=True,
            )  # fmt: skip
            speed[mode] = out.new_tokens / (clock.perf_counter() - start)
    ratio = speed["memory"] / speed["none"]
    lines += [
        "Decoding speed, batch 8, "
        f"{settings.max_new_tokens} new tokens per row (memories swapped every 64 tokens): "
        f"{speed['memory']:.0f} tokens/s with memory, {speed['none']:.0f} without "
        f"(ratio {ratio:.2f}; the paper: 0.65).",
        "",
    ]
    (run.path / "generation.md").write_text("\n".join(lines))
    results = {"prompts": prompts, "tokens_per_second": speed, "ratio": ratio}
    (run.path / "generation.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_bars(
        run.path / "throughput.png", ["with memory", "without memory"],
        [speed["memory"], speed["none"]], ylabel="tokens/s", title="Decoding speed, batch 8",
    )  # fmt: skip
    run.finish({"generation": results})
    return run.path


def _runner(stage: str) -> Callable[..., Path]:
    if stage == "world":
        return write_world
    if stage in ("warmup", "continual"):
        from m3.training.fit import fit

        return fit
    if stage == "build_memory":
        from m3.bank.build import build_memory

        return build_memory
    if stage == "evaluate":
        from m3.inference.evaluate import evaluate_recipe

        return evaluate_recipe
    if stage == "generate":
        return generate_sample
    if stage == "edit":
        return measure_edits_stage
    if stage == "lm_eval":
        from m3.inference.harness_runs import lm_eval_recipe

        return lm_eval_recipe
    raise UserError(f"stage: no runner for stage {stage!r}")


def _check_inputs(name: str, stage: Recipe) -> None:
    """Check a stage's recipe again, files included, now that earlier stages have run."""
    _, problems = validate(stage.to_dict())
    if problems:
        found = [Problem(f"stages.{name}: {p.path}", p.message) for p in problems]
        raise RecipeError(found, sources=f"stage {name!r}")


def _chain(previous: str, recipe: Recipe) -> str:
    digest = hashlib.sha256(f"{previous}:{recipe_fingerprint(recipe.to_dict())}".encode())
    return digest.hexdigest()


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_pipeline(
    recipe: Recipe, *, overwrite: bool = False, echo: Callable[[str], None] = print
) -> Path:
    """Run every stage of a pipeline recipe that is not done yet, then write its report.

    Args:
        recipe: A checked recipe with `stage: pipeline`.
        overwrite: Allow a run folder that another recipe wrote; its stages whose
            fingerprints changed run again.
        echo: Where progress lines go.

    Returns:
        The report (`<output>/report.md`).

    Raises:
        UserError: For a run folder of another recipe (without `overwrite`), a stage whose
            input is missing, or any stage's own error.
    """
    from m3.report import write_report

    with registry.input_files_unchecked():  # earlier stages write the later stages' inputs
        stages = stage_recipes(recipe)
    output = Path(recipe.output)
    state_file = output / STATE
    state = _read_state(state_file)
    fingerprint = recipe_fingerprint(recipe.to_dict())
    if state.get("recipe") not in (None, fingerprint) and not overwrite:
        raise UserError(
            f"{output} holds the outputs of another recipe (its {STATE} differs): choose "
            "another output, or pass --overwrite to re-run the stages that changed"
        )
    if not state and output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(
            f"{output} is not empty and holds no {STATE}: choose another output, or pass "
            "--overwrite"
        )
    output.mkdir(parents=True, exist_ok=True)
    done: dict[str, Any] = state.get("stages", {})
    state = {"recipe": fingerprint, "stages": done}
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    chain = ""
    for number, (name, stage) in enumerate(stages, start=1):
        chain = _chain(chain, stage)
        folder = Path(stage.output)
        label = f"[{number}/{len(stages)}] {name} ({stage.stage})"
        previous = done.get(name, {})
        if previous.get("fingerprint") == chain and RunFolder(folder, stage.to_dict(), "").complete:
            echo(f"{label}: done before ({previous.get('seconds', 0):.0f} s), skipped")
            continue
        if folder.is_dir() and name in done:
            shutil.rmtree(folder)  # this pipeline's own stale outputs: their inputs changed
        done.pop(name, None)
        _check_inputs(name, stage)
        echo(f"{label} → {folder}")
        start = time.perf_counter()
        _runner(stage.stage)(stage, overwrite=overwrite)
        seconds = time.perf_counter() - start
        done[name] = {"fingerprint": chain, "seconds": seconds, "stage": stage.stage}
        state_file.write_text(json.dumps(state, indent=2) + "\n")
        echo(f"{label}: finished in {seconds:.0f} s")
    report = write_report(recipe, stages, done)
    echo(f"report: {report}")
    return report
