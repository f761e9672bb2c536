r"""Running lm-evaluation-harness on m3: the `m3 lm-eval` command and the `lm_eval` stage.

lm-eval finds no model outside its own package by itself, so `m3 lm-eval ARGS…` imports
`m3.inference.harness` (which registers the `m3` model) and then runs lm-eval's own command
line with the same arguments:

```bash
m3 lm-eval --model m3 --model_args bank=runs/tiny/bank,mode=memory,k=5,threshold=0.667 \\
    --tasks arc_challenge --num_fewshot 25 --batch_size 8
```

A recipe's `lm_eval` stage (`stage: lm_eval`, the `lm_eval:` section) scores its tasks once
per mode, loading the model and its bank once, and writes `lm_eval.json` (every metric of
every task per mode) and `lm_eval.md` (one row per task, one column per mode) into its
output folder; a pipeline's report includes the table. Two local tasks are written by the
stage itself from the recipe's `evaluation.cloze` questions: `m3_cloze` (`write_cloze_task`),
a multiple-choice task whose `acc` is `m3 evaluate`'s cloze accuracy, and `m3_generation`
(`write_generation_task`), a `generate_until` task whose `exact` and `contains` are the
generation metric's (`m3.inference.generation_score`). Nothing here needs a hub: local tasks
(`m3_cloze`, `m3_generation`, YAML files) load offline.

This module imports lm-eval and torch only inside its functions, so that `m3 --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3.core.errors import UserError

if TYPE_CHECKING:
    from m3.recipes import Recipe

__all__ = [
    "CLOZE_TASK",
    "GENERATION_TASK",
    "add_lm_eval_verb",
    "cloze_task",
    "contains",
    "exact",
    "generation_task",
    "lm_eval_recipe",
    "markdown_table",
    "run_lm_eval_cli",
    "task_specs",
    "write_cloze_task",
    "write_generation_task",
]

#: The local multiple-choice task the `lm_eval` stage writes from `evaluation.cloze`.
CLOZE_TASK = "m3_cloze"
#: The local generation task the `lm_eval` stage writes from `evaluation.cloze`.
GENERATION_TASK = "m3_generation"
#: The module next to a written `m3_generation` YAML that its `!function` metrics name.
_METRICS_MODULE = "m3_generation_metrics"

_OFFLINE = (
    "lm-eval's tasks download their datasets from the Hugging Face Hub; where it cannot be "
    "reached, use local task files (a task YAML over local JSON, e.g. the m3_cloze task: "
    "docs, Evaluating with lm-evaluation-harness)"
)


# ------------------------------------------------------------------------ the command
def add_lm_eval_verb(verbs: Any) -> None:
    """Add `m3 lm-eval` to the `m3` command's verbs (every argument goes to lm-eval).

    Args:
        verbs: The sub-parsers of the `m3` command.
    """
    # no option of its own: with prefix_chars that no argument holds, `--model …` and
    # `--help` are plain arguments, passed on to lm-eval's own parser
    verb = verbs.add_parser(
        "lm-eval",
        prefix_chars="\0",
        add_help=False,
        help="run lm-evaluation-harness with m3's model registered (--model m3)",
        description="lm-eval's command line, with the m3 model registered.",
    )
    verb.add_argument("arguments", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    verb.set_defaults(handler=lambda args: run_lm_eval_cli(args.arguments))


def run_lm_eval_cli(arguments: Sequence[str]) -> int:
    """Run lm-eval's command line (`lm_eval ARGS…`) with m3's model registered.

    Args:
        arguments: lm-eval's arguments, e.g. `["--model", "m3", "--tasks", "…"]`.

    Returns:
        0 once lm-eval has finished.

    Raises:
        UserError: For wrong model arguments (naming the argument), or tasks that lm-eval
            does not know or cannot load (naming `--tasks`).
    """
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import m3.inference.harness  # noqa: F401  (registers the m3 model)

    if list(arguments) in ([], ["-h"], ["--help"]):  # m3's usage first, then lm-eval's help
        print(
            "usage: m3 lm-eval LM_EVAL_ARGUMENTS ...\n\n"
            "lm-eval's command line with m3's model registered, e.g.\n"
            "  m3 lm-eval --model m3 --model_args bank=BANK,weights=RUN,mode=memory "
            "--tasks TASKS\n"
            "(modes: memory, none, rag, warmup; see docs/guides/lm-eval.md). lm-eval's own "
            "help follows.\n"
        )
        arguments = ["--help"]
    setup_logging()
    for handler in logging.getLogger("lm_eval").handlers:  # lm-eval binds stderr once, at
        if type(handler) is logging.StreamHandler:  # its first call: follow the current one
            handler.stream = sys.stderr  # (setStream would flush the old one, maybe closed)
    saved = sys.argv
    sys.argv = ["lm-eval", *arguments]  # HarnessCLI reads sys.argv, as `lm_eval` does
    try:
        parser = HarnessCLI()
        parsed = parser.parse_args()
        with _tasks_named("--tasks"):
            parser.execute(parsed)
    finally:
        sys.argv = saved
    return 0


class _tasks_named:
    """Turn lm-eval's errors on tasks it cannot find or load into one-line user errors."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _: object) -> None:
        if error is None:
            return
        text = str(error).strip("'\"")
        if isinstance(error, (ConnectionError, FileNotFoundError)):
            raise UserError(f"{self.where}: lm-eval could not load a task: {text}. {_OFFLINE}")
        unknown = isinstance(error, KeyError) and "not a registered task" in text
        if unknown or (isinstance(error, ValueError) and text.startswith("Tasks not found")):
            raise UserError(f"{self.where}: {text} (`lm-eval ls tasks` lists lm-eval's tasks)")


# -------------------------------------------------------------------------- the tasks
def _local_task(cloze: str | Path, name: str) -> dict[str, Any]:
    """What both local tasks share: the questions' file as the test split, their fields."""
    cloze = Path(cloze)
    if not cloze.is_file():
        raise UserError(f"evaluation.cloze: {cloze} does not exist (the {name} task reads it)")
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(cloze.resolve())}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "doc_to_choice": "options",
        "doc_to_target": "answer",
    }


def cloze_task(cloze: str | Path, *, name: str = CLOZE_TASK) -> dict[str, Any]:
    """A local lm-eval task over cloze questions (`prompt`, `options`, `answer`).

    The task reads the JSON Lines file itself (`World.write`'s `cloze.jsonl`); its context
    is the prompt, its choices the options (each starting with a space) with no delimiter
    between them, so that lm-eval's `acc` is `evaluate_cloze`'s accuracy.

    Args:
        cloze: The questions' JSON Lines file.
        name: The task's name.

    Returns:
        The task's config, as a task YAML holds it.

    Raises:
        UserError: When the questions' file does not exist.
    """
    return _local_task(cloze, name) | {
        "output_type": "multiple_choice",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def write_cloze_task(cloze: str | Path, folder: str | Path, *, name: str = CLOZE_TASK) -> Path:
    """Write `cloze_task` as a task YAML, for `lm_eval --tasks FILE` or `--include_path`.

    Args:
        cloze: The questions' JSON Lines file.
        folder: Where the YAML goes.
        name: The task's name.

    Returns:
        The YAML file (`<folder>/<name>.yaml`).
    """
    import yaml

    task = cloze_task(cloze, name=name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def exact(references: Sequence[str], predictions: Sequence[str]) -> float:
    """The `m3_generation` task's `exact`: the continuation's first words are the answer's.

    lm-eval calls a task's metric function once per document, with one reference and one
    prediction; this is `m3.inference.generation_score.match_answer`'s exact match.

    Args:
        references: `[answer]`, the correct option's text.
        predictions: `[continuation]`, the generated text.

    Returns:
        1.0 or 0.0.
    """
    from m3.inference.generation_score import match_answer

    return float(match_answer(predictions[0], references[0])[0])


def contains(references: Sequence[str], predictions: Sequence[str]) -> float:
    """The `m3_generation` task's `contains`: the answer's words appear in the continuation.

    Args:
        references: `[answer]`, the correct option's text.
        predictions: `[continuation]`, the generated text.

    Returns:
        1.0 or 0.0 (`m3.inference.generation_score.match_answer`'s contains match).
    """
    from m3.inference.generation_score import match_answer

    return float(match_answer(predictions[0], references[0])[1])


def generation_task(
    cloze: str | Path, *, max_new_tokens: int = 16, name: str = GENERATION_TASK
) -> dict[str, Any]:
    """A local lm-eval `generate_until` task over cloze questions: the generation metric.

    Each document's context is the cloze prompt; the model decodes greedily
    `max_new_tokens` tokens with no stop string (EOS aside), as
    `m3.inference.generation_score.evaluate_generation` does; `exact` and `contains` score
    the continuation against the correct option exactly as that function does.

    Args:
        cloze: The questions' JSON Lines file (`prompt`, `options`, `answer`).
        max_new_tokens: Tokens generated per question (`evaluation.generation.max_new_tokens`).
        name: The task's name.

    Returns:
        The task's config, its metric functions as callables (`write_generation_task`
        writes them as `!function` references).

    Raises:
        UserError: When the questions' file does not exist.
    """
    return _local_task(cloze, name) | {
        "output_type": "generate_until",
        "generation_kwargs": {
            "until": [],
            "max_gen_toks": max_new_tokens,
            "do_sample": False,
            "temperature": 0.0,
        },
        "metric_list": [
            {"metric": exact, "aggregation": "mean", "higher_is_better": True},
            {"metric": contains, "aggregation": "mean", "higher_is_better": True},
        ],
    }


def write_generation_task(
    cloze: str | Path,
    folder: str | Path,
    *,
    max_new_tokens: int = 16,
    name: str = GENERATION_TASK,
) -> Path:
    """Write `generation_task` as a task YAML, with the module its metrics come from.

    Next to `<name>.yaml` goes `m3_generation_metrics.py`, which imports `exact` and
    `contains` from m3: lm-eval resolves a YAML's `!function module.name` from a file beside it.

    Args:
        cloze: The questions' JSON Lines file.
        folder: Where the YAML goes.
        max_new_tokens: Tokens generated per question.
        name: The task's name.

    Returns:
        The YAML file (`<folder>/<name>.yaml`).
    """
    import yaml

    task = generation_task(cloze, max_new_tokens=max_new_tokens, name=name)
    metrics = task.pop("metric_list")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{_METRICS_MODULE}.py").write_text(
        f'"""The {name} task\'s metrics (written by m3.inference.harness_runs)."""\n\n'
        "from m3.inference.harness_runs import contains, exact\n\n"
        '__all__ = ["contains", "exact"]\n'
    )
    listed = "".join(
        f"- metric: !function {_METRICS_MODULE}.{m['metric'].__name__}\n"
        f"  aggregation: {m['aggregation']}\n  higher_is_better: true\n"
        for m in metrics
    )
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False) + "metric_list:\n" + listed)
    return path


def task_specs(tasks: Sequence[str]) -> tuple[list[str | dict[str, Any]], bool]:
    """lm-eval task specs: names as they are, YAML files read as task configs.

    Args:
        tasks: Task names or paths of task YAML files.

    Returns:
        The specs, and whether every task is a local file (lm-eval's own index of tasks is
        then not needed).

    Raises:
        UserError: For a YAML file that does not exist.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    specs: list[str | dict[str, Any]] = []
    for task in tasks:
        if task.endswith((".yaml", ".yml")):
            if not Path(task).is_file():
                raise UserError(f"lm_eval.tasks: {task} does not exist")
            specs.append(load_yaml(task, resolve_func=True))
        else:
            specs.append(task)
    return specs, all(isinstance(s, dict) for s in specs)


# -------------------------------------------------------------------------- the stage
def _scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Task -> metric -> value, from `simple_evaluate`'s results (stderrs kept, aliases not)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {
            key: float(value)
            for key, value in metrics.items()
            if key != "alias" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return out


def _main_metric(metrics: dict[str, float]) -> str | None:
    names = [k for k in metrics if "_stderr" not in k]
    for preferred in ("acc,", "exact_match,", "exact,", "acc_norm,", "word_perplexity,"):
        for name in names:
            if name.startswith(preferred):
                return name
    return names[0] if names else None


def markdown_table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """lm-eval's results as Markdown: one row per task, one column per mode.

    Each cell is the task's main metric (`acc` where it has one, else `exact_match`,
    `exact` (`m3_generation`), `acc_norm`, `word_perplexity` or its first), with its
    standard error where lm-eval gives one.

    Args:
        scores: Mode -> task -> metric -> value (`lm_eval.json`'s `scores`).

    Returns:
        Markdown text.
    """
    modes = list(scores)
    tasks = list(dict.fromkeys(t for by_task in scores.values() for t in by_task))
    lines = [
        "lm-evaluation-harness:",
        "",
        "| task | metric | " + " | ".join(modes) + " |",
        "|---|---|" + "---:|" * len(modes),
    ]
    for task in tasks:
        first = next(scores[m][task] for m in modes if task in scores[m])
        metric = _main_metric(first)
        if metric is None:
            continue
        name, _, kept = metric.partition(",")
        stderr = f"{name}_stderr,{kept}"
        cells = []
        for mode in modes:
            value = scores[mode].get(task, {}).get(metric)
            error = scores[mode].get(task, {}).get(stderr)
            cell = "–" if value is None else f"{value:.4f}"
            if value is not None and error is not None and error == error:  # not NaN
                cell += f" ± {error:.4f}"
            cells.append(cell)
        lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _generation_tokens(recipe: Recipe) -> int:
    """`evaluation.generation.max_new_tokens`, or its default: the `m3_generation` task's."""
    from m3.recipes import GenerationMetricSection

    settings = recipe.evaluation.generation if recipe.evaluation else None
    return (settings or GenerationMetricSection()).max_new_tokens


def lm_eval_recipe(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """Run the lm-eval stage a recipe describes (`stage: lm_eval`).

    Loads the model and its bank once (`load_inference`), then scores the `lm_eval.tasks`
    once per mode of `lm_eval.modes` through `lm_eval.simple_evaluate`; writes
    `lm_eval.json` and `lm_eval.md` into the recipe's output folder. `m3_generation`
    decodes `evaluation.generation.max_new_tokens` tokens per question (16 by default).

    Args:
        recipe: A checked recipe with an `lm_eval:` section and what `load_inference` needs
            (weights, tokenizer, `retrieval.bank`).
        overwrite: Replace a folder that another recipe wrote.

    Returns:
        The output folder.

    Raises:
        UserError: For no tasks, a task lm-eval cannot find or load (naming
            `lm_eval.tasks`), the `m3_cloze` or `m3_generation` task without
            `evaluation.cloze`, or a bank that does not belong to the model.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from m3.core.runs import RunFolder
    from m3.inference.harness import M3LM
    from m3.inference.loading import load_inference
    from m3.recipes import LmEvalSection

    spec = recipe.lm_eval or LmEvalSection()
    if not spec.tasks:
        raise UserError("lm_eval.tasks: name one or more tasks")
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        print(f"m3 lm-eval: {run.path} is complete for this recipe; nothing to do")
        return run.path
    specs, local = task_specs(spec.tasks)
    cloze = recipe.evaluation.cloze if recipe.evaluation else None
    steps = _generation_tokens(recipe)
    for name, build in ((CLOZE_TASK, cloze_task), (GENERATION_TASK, generation_task)):
        if name in specs:
            if cloze is None:
                raise UserError(
                    f"lm_eval.tasks: the {name} task reads evaluation.cloze; name the file"
                )
            extra = {"max_new_tokens": steps} if name == GENERATION_TASK else {}
            specs[specs.index(name)] = build(cloze, **extra)
            local = all(isinstance(s, dict) for s in specs)
    manager = TaskManager(include_path=spec.include_path, include_defaults=not local)
    with _tasks_named("lm_eval.tasks"):
        manager.load(specs)  # checked before the model loads and the folder is claimed
    scores: dict[str, dict[str, dict[str, float]]] = {}
    with load_inference(recipe) as inference:
        run.claim(overwrite=overwrite)
        if cloze is not None and CLOZE_TASK in spec.tasks:  # to read, and to run with lm_eval
            write_cloze_task(cloze, run.path)
        if cloze is not None and GENERATION_TASK in spec.tasks:
            write_generation_task(cloze, run.path, max_new_tokens=steps)
        for mode in spec.modes:
            model = M3LM.from_inference(
                inference,
                mode=mode,
                protocol=spec.protocol,
                batch_size=spec.batch_size,
            )
            with _tasks_named("lm_eval.tasks"):
                results = lm_eval.simple_evaluate(
                    model=model,
                    tasks=specs,
                    num_fewshot=spec.num_fewshot,
                    limit=spec.limit,
                    task_manager=manager,
                    log_samples=False,
                    bootstrap_iters=spec.bootstrap_iters,
                    random_seed=recipe.seed,
                    numpy_random_seed=recipe.seed,
                    torch_random_seed=recipe.seed,
                    fewshot_random_seed=recipe.seed,
                )
            scores[mode] = _scores(results or {})
    table = markdown_table(scores)
    (run.path / "lm_eval.json").write_text(
        json.dumps({"tasks": list(spec.tasks), "scores": scores}, indent=2) + "\n"
    )
    (run.path / "lm_eval.md").write_text(table)
    print(table)
    run.finish({"lm_eval": scores})
    return run.path
