"""The `m3` command.

Each verb is a small function that imports what it needs only when it runs, so that
`m3 --help` answers without loading torch or Lightning. User errors (`m3.core.errors.UserError`)
are printed as one message, without a traceback, and exit with status 2.

Adding a verb is a function that adds its parser and sets its handler (see `_add_fit`),
plus an entry in `_VERBS`; a verb that runs a recipe takes `RECIPE… [KEY=VALUE…]` through
`add_recipe_arguments` and reads it with `recipe_from_args`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from m3 import __version__
from m3.core.errors import UserError
from m3.inference.harness_runs import add_lm_eval_verb
from m3.recipes.arguments import add_recipe_arguments, recipe_from_args, split_recipe_arguments

Verb = Callable[[argparse.Namespace], int]
Subparsers = Any  # argparse's sub-parser action has no public type


def _smoke(args: argparse.Namespace) -> int:
    from m3.smoke import smoke

    smoke(preset=args.preset, seed=args.seed)
    return 0


def _add_smoke(verbs: Subparsers) -> None:
    smoke = verbs.add_parser(
        "smoke",
        help="run a model preset with random memories and check cached decoding",
        description=(
            "Build a randomly initialised model, run one forward pass with random explicit "
            "memories, decode with a KV cache and memory swaps, and check that both agree."
        ),
    )
    smoke.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    smoke.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    smoke.set_defaults(handler=_smoke)


# ---------------------------------------------------------------------------------------
# Recipes on the command line


def _folder_or_recipe(args: argparse.Namespace) -> tuple[Any, list[str]]:
    # a bank or stage folder named alone (its recipe.yaml, with the overrides), else a recipe
    files, overrides = split_recipe_arguments(args.recipe_items)
    if len(files) == 1 and os.path.isdir(files[0]):
        return files[0], overrides
    return recipe_from_args(args), []


def _add_overwrite(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def _add_batch_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="references per forward pass (default: the recipe's bank.batch_size, 64)",
    )


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def _check(args: argparse.Namespace) -> int:
    import contextlib

    from m3.core.registry import input_files_unchecked

    with input_files_unchecked() if args.no_file_checks else contextlib.nullcontext():
        recipe = recipe_from_args(args)
    if not args.quiet:
        print(recipe.to_yaml(), end="")
    config = recipe.model.config()
    parts = [f"model {recipe.model.preset} ({_count(config.num_parameters)} parameters)"]
    for name in ("tokenizer", "chunker"):
        spec = getattr(recipe, name)
        parts.append(f"{name} {spec.class_path if spec is not None else '(none)'}")
    files, _ = split_recipe_arguments(args.recipe_items)
    print(f"m3: ok: {' + '.join(files)}: {', '.join(parts)}", file=sys.stderr)
    return 0


def _add_check(verbs: Subparsers) -> None:
    check = verbs.add_parser(
        "check",
        help="check a recipe and print it resolved, before running anything",
        description=(
            "Merge the recipe files in order, apply the KEY=VALUE overrides, resolve "
            "${...} interpolations and check everything: unknown keys, wrong types, unknown "
            "classes, constructor arguments, numbers out of range, missing files. Prints the "
            "resolved recipe as YAML (which is itself a valid recipe) and a one-line summary, "
            "or lists every problem and exits with status 2."
        ),
    )
    add_recipe_arguments(check)
    check.add_argument("-q", "--quiet", action="store_true", help="print only the one-line summary")
    check.add_argument(
        "--no-file-checks",
        action="store_true",
        help="do not report missing input files (a recipe written for another machine)",
    )
    check.set_defaults(handler=_check)


def _recipes(args: argparse.Namespace) -> int:
    from m3.recipes import RECIPES_DIR, shipped_recipes

    found = shipped_recipes()
    if not found:
        print(f"m3: no recipes at {RECIPES_DIR}: they come with a source checkout of m3")
        return 0
    root = RECIPES_DIR.parent
    print(f"Shipped recipes (run the commands from {_shown(root)}):")
    for recipe in found:
        print(
            f"\n{recipe.path.relative_to(root)}\n    {recipe.description}\n    $ {recipe.command}"
        )
    return 0


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


def _add_recipes(verbs: Subparsers) -> None:
    recipes = verbs.add_parser(
        "recipes",
        help="list the shipped recipes and the command that runs each",
        description="List every recipe in recipes/ with its description and its command.",
    )
    recipes.set_defaults(handler=_recipes)


def _components(args: argparse.Namespace) -> int:
    from m3.core import registry

    for module in args.modules or ():
        registry.load_module(module)
    kinds = [args.kind] if args.kind else list(registry.KINDS)
    for i, kind in enumerate(kinds):
        base = registry.base_class(kind)
        table = registry.available(kind)
        if i:
            print()
        print(f"{kind}: subclasses of {registry.class_path_of(base)}")
        rows = [(n, registry.class_path_of(c), registry.describe(c)) for n, c in table.items()]
        width = [max((len(row[c]) for row in rows), default=0) for c in range(2)]
        for name, path, doc in rows:
            print(f"  {name:<{width[0]}}  {path:<{width[1]}}  {doc}".rstrip())
    return 0


def _add_components(verbs: Subparsers) -> None:
    from m3.core.registry import KINDS

    components = verbs.add_parser(
        "components",
        help="list the classes available for each kind of component",
        description=(
            "List every class that a recipe can name for each kind of component: its short "
            "name (for class_path), its dotted path and the first line of its docstring. "
            "Your own subclasses appear once their module is imported: name it with --import."
        ),
    )
    components.add_argument(
        "kind", nargs="?", choices=list(KINDS), metavar="KIND", help=f"one of: {', '.join(KINDS)}"
    )
    components.add_argument(
        "--import",
        dest="modules",
        action="append",
        metavar="MODULE",
        help="import this module first, e.g. my_lab.tokenizers (repeatable)",
    )
    components.set_defaults(handler=_components)


def _size(args: argparse.Namespace) -> int:
    import contextlib

    from m3.core.registry import input_files_unchecked
    from m3.sizing import PAPER_REFERENCES, format_report, parse_references, recipe_size_report

    # A bare number among the recipe arguments is N; paths and KEY=VALUE are the recipe.
    counts, items = [], []
    for item in args.recipe_items:
        is_count = (
            item[:1] in "+-.0123456789"
            and "=" not in item
            and not any(sep in item for sep in "/\\")
            and not item.endswith((".yaml", ".yml"))
            and not os.path.exists(item)
        )
        (counts if is_count else items).append(item)
    if len(counts) > 1:
        raise UserError(f"give N, the number of references, once; got {' and '.join(counts)}")
    references = parse_references(counts[0]) if counts else PAPER_REFERENCES
    with input_files_unchecked() if args.no_file_checks else contextlib.nullcontext():
        recipe = recipe_from_args(argparse.Namespace(recipe_items=items))
    report = recipe_size_report(
        recipe,
        references,
        bytes_per_number=args.bytes_per_number,
        code_bytes=args.code_bytes,
        train_length=args.train_length,
    )
    files, _ = split_recipe_arguments(items)
    print(format_report(report, source=" + ".join(files)), end="")
    return 0


def _add_size(verbs: Subparsers) -> None:
    size = verbs.add_parser(
        "size",
        help="print the storage size of explicit memories and the paper's cost model",
        description=(
            "Print the bytes of one reference's memory (sparse, vector-quantized, and the "
            "MHA-equivalent dense key/values the paper compares with), their totals for N "
            "references in binary (TiB) and decimal (TB) units, and the paper's cost model in "
            "TFLOPs, from the recipe's model. N is a bare number among the "
            "recipe arguments (e.g. 1.12e8 or 112000000; default: the paper's 1.12e8). "
            "A recipe's bank section sets the stored dtype and the quantizer's code size. "
            "Loads no torch unless the recipe names a quantizer."
        ),
    )
    add_recipe_arguments(size)
    size.usage = "%(prog)s [options] RECIPE [RECIPE ...] [N] [KEY=VALUE ...]"
    size.add_argument(
        "--bytes-per-number",
        type=int,
        default=None,
        metavar="B",
        help="bytes per stored number, unquantized (default: the recipe's bank.dtype, else 2)",
    )
    size.add_argument(
        "--code-bytes",
        type=int,
        default=None,
        metavar="B",
        help="bytes per key/value vector when quantized (default: the recipe's "
        "bank.quantizer, else 14: the paper's VQ codes)",
    )
    size.add_argument(
        "--train-length",
        type=int,
        default=None,
        metavar="TOKENS",
        help="training context l_train of the cost model (default: the model's block_size)",
    )
    size.add_argument(
        "--no-file-checks",
        action="store_true",
        help="do not report missing input files: size a recipe before its data and "
        "checkpoint are here (only the model and bank sections are used)",
    )
    size.set_defaults(handler=_size)


# Each adds one verb; later verbs (fit, build-memory, generate, evaluate, size, run) too.
def _fit(args: argparse.Namespace) -> int:
    from m3.training.fit import fit

    fit(recipe_from_args(args), overwrite=args.overwrite)
    return 0


def _add_fit(verbs: Subparsers) -> None:
    fit = verbs.add_parser(
        "fit",
        help="train one stage (warmup or continual) of a recipe",
        description=(
            "Train the recipe's stage with Lightning's Trainer: 'warmup' (no memory) or "
            "'continual' (explicit memory, starting from training.init_weights). Trainer "
            "options are recipe keys: trainer.max_steps=200 trainer.devices=2 "
            "trainer.precision=bf16-mixed. An interrupted run resumes from its last checkpoint."
        ),
    )
    add_recipe_arguments(fit)
    _add_overwrite(fit, "replace an output folder another recipe wrote")
    fit.set_defaults(handler=_fit)


def _build_memory(args: argparse.Namespace) -> int:
    from m3.bank.build import build_memory

    shard = None
    if args.shard is not None:
        rank, _, world = args.shard.partition("/")
        if not (rank.isdigit() and world.isdigit() and int(rank) < int(world)):
            raise UserError(f"--shard takes RANK/WORLD_SIZE, e.g. 0/4; got {args.shard!r}")
        shard = (int(rank), int(world))
    build_memory(recipe_from_args(args), overwrite=args.overwrite, batch_size=args.batch_size,
                 dtype=args.dtype, shard=shard)  # fmt: skip
    return 0


def _add_build_memory(verbs: Subparsers) -> None:
    build = verbs.add_parser(
        "build-memory",
        help="encode a knowledge base into a memory bank (store shards + index)",
        description=(
            "Encode every reference of the recipe's data.knowledge with the weights named by "
            "training.init_weights, through Lightning's Trainer.predict (trainer.devices=N "
            "writes one shard per rank), then embed the references and build the index. An "
            "interrupted build resumes where it stopped."
        ),
    )
    add_recipe_arguments(build)
    _add_overwrite(build, "start again: delete the output folder, whoever wrote it, and build anew")
    _add_batch_size(build)
    build.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the stored keys and values (default: the recipe's bank.dtype, float32)",
    )
    build.add_argument(
        "--shard",
        metavar="RANK/WORLD_SIZE",
        help="write only this shard (ranks launched by hand, without a distributed strategy)",
    )
    build.set_defaults(handler=_build_memory)


def _generate(args: argparse.Namespace) -> int:
    from m3.inference.generate import generate
    from m3.inference.loading import load_inference
    from m3.recipes import GenerationSection, load_recipe

    source, overrides = _folder_or_recipe(args)
    folder_recipe = isinstance(source, str) and load_recipe(Path(source) / "recipe.yaml", overrides)
    settings = (folder_recipe or source).generation or GenerationSection()
    chosen = {
        name: getattr(settings, name) if getattr(args, name) is None else getattr(args, name)
        for name in ("max_new_tokens", "mode", "temperature", "top_k", "top_p")
    }
    with load_inference(source, overrides=overrides) as inference:
        out = generate(inference, args.prompt, seed=args.seed, **chosen)
    for row in range(len(out.prompts)):
        print(out.describe(row, references=args.show_references))
    return 0


def _add_generate(verbs: Subparsers) -> None:
    generate = verbs.add_parser(
        "generate",
        help="continue prompts, reading explicit memories from a memory bank",
        description=(
            "Load the model, its tokenizer and the memory bank named by retrieval.bank (or a "
            "bank folder given as RECIPE), check that they belong together, and continue each "
            "prompt: every 64-token chunk reads the memories its text retrieved, swapped while "
            "decoding. --mode none reads no memories; --mode rag puts the retrieved references "
            "before the prompt as text; --mode warmup reads the model as a plain causal LM (no "
            "reference prefix, no memories). Options override the recipe's generation: section."
        ),
    )
    add_recipe_arguments(generate)
    generate.add_argument(
        "--prompt", action="append", required=True, metavar="TEXT", help="a prompt (repeatable)"
    )
    generate.add_argument("--max-new-tokens", type=int, metavar="N", help="most new tokens")
    generate.add_argument(
        "--mode", choices=["memory", "none", "rag", "warmup"], help="what the model reads"
    )
    generate.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature (0: greedy)"
    )
    generate.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest")
    generate.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    generate.add_argument(
        "--show-references",
        action="store_true",
        help="print the references (id, score, text) each chunk read",
    )
    generate.set_defaults(handler=_generate)


def _evaluate(args: argparse.Namespace) -> int:
    from m3.inference.evaluate import evaluate_recipe

    recipe = recipe_from_args(args)
    if recipe.stage != "evaluate":
        raise UserError(f"stage: m3 evaluate runs 'evaluate' stages, got {recipe.stage!r}")
    evaluate_recipe(recipe, overwrite=args.overwrite)
    return 0


def _add_evaluate(verbs: Subparsers) -> None:
    evaluate = verbs.add_parser(
        "evaluate",
        help="score a model with memory, without memory and with RAG",
        description=(
            "Load the model and its memory bank (retrieval.bank), then score multiple-choice "
            "cloze questions (evaluation.cloze: with memory, without, with RAG, and with "
            "memories shuffled across questions) and held-out text (evaluation.heldout: loss, "
            "perplexity, accuracy under the paper's and the causal retrieval protocol). "
            "Writes evaluation.json, evaluation.md and PNG plots to the recipe's output."
        ),
    )
    add_recipe_arguments(evaluate)
    _add_overwrite(evaluate, "replace an output folder of another recipe")
    evaluate.set_defaults(handler=_evaluate)


def _run(args: argparse.Namespace) -> int:
    from m3.core import registry
    from m3.pipeline import run_pipeline

    with registry.input_files_unchecked():  # earlier stages write the later stages' inputs
        recipe = recipe_from_args(args)
    if recipe.stage != "pipeline":
        raise UserError(
            f"stage: m3 run runs recipes with stages (stage: pipeline), got {recipe.stage!r}; "
            "use m3 fit, m3 build-memory, m3 evaluate or m3 generate for one stage"
        )
    run_pipeline(recipe, overwrite=args.overwrite)
    return 0


def _add_run(verbs: Subparsers) -> None:
    run = verbs.add_parser(
        "run",
        help="run every stage of a pipeline recipe, skipping those already done",
        description=(
            "Run the stages a pipeline recipe lists (stages: name -> stage recipe), in order, "
            "then write <output>/report.md. A stage whose outputs exist for the same inputs is "
            "skipped, so a run that was interrupted continues where it stopped. Change a "
            "stage's keys from the command line, e.g. stages.warmup.trainer.max_steps=50."
        ),
    )
    add_recipe_arguments(run)
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="allow an output folder of another recipe: re-run the stages that changed",
    )
    run.set_defaults(handler=_run)


def _edit(args: argparse.Namespace) -> int:
    from m3.bank.edit import edit_from_recipe, read_replacements, resolve_bank, resume_edit

    source, overrides = _folder_or_recipe(args)
    if args.resume:
        if args.replace or args.delete:
            raise UserError("--resume clears an interrupted edit: give no --replace/--delete")
        summary = resume_edit(resolve_bank(source, overrides))
        if summary is None:
            print("m3 edit: no interrupted edit to resume")
            return 0
    else:
        replace = read_replacements(args.replace) if args.replace else []
        summary = edit_from_recipe(
            source, overrides=overrides, replace=replace, delete=args.delete or (),
            batch_size=args.batch_size,
        )  # fmt: skip
    print(f"m3 edit: {summary.describe()}")
    return 0


def _add_edit(verbs: Subparsers) -> None:
    edit = verbs.add_parser(
        "edit",
        help="replace or delete documents of a memory bank (store and index together)",
        description=(
            "Knowledge editing without retraining: re-encode the new texts of knowledge-base "
            "documents (addressed by document id) with the weights that wrote the bank, "
            "write their memories to the store and their embeddings to the index, or remove "
            "documents from both. RECIPE is a bank folder (its recipe.yaml) or recipe files "
            "naming the bank (retrieval.bank, or a build_memory recipe's output), the "
            "weights (training.init_weights) and the tokenizer. The bank serves while it is "
            "edited: readers see it before or after the edit, never a mix; an interrupted "
            "edit leaves it as it was."
        ),
    )
    add_recipe_arguments(edit)
    edit.usage = (
        "%(prog)s [options] BANK|RECIPE [RECIPE ...] [KEY=VALUE ...] "
        "[--replace FILE] [--delete ID ...]"
    )
    edit.add_argument(
        "--replace",
        metavar="FILE",
        help='JSON Lines of {"id": DOCUMENT_ID, "text": NEW_TEXT}: the documents to replace',
    )
    edit.add_argument(
        "--delete", nargs="+", action="extend", metavar="ID", help="ids of documents to remove"
    )
    edit.add_argument(
        "--resume",
        action="store_true",
        help="delete what an interrupted edit left, or finish an earlier m3's in-place edit",
    )
    _add_batch_size(edit)
    edit.set_defaults(handler=_edit)


def _verify(args: argparse.Namespace) -> int:
    from m3.bank.verify import verify_and_report

    return 0 if verify_and_report(args.bank, repair=args.repair) else 1


def _add_verify(verbs: Subparsers) -> None:
    verify = verbs.add_parser(
        "verify",
        help="check every shard, the index and the manifest of a memory bank",
        description=(
            "Read the whole bank (every row's crc32, slot tables, provenance, the index's ids, "
            "the manifest's files, fingerprints), print a summary and the damaged reference "
            "ids; exit 0 only when every check holds. --repair rebuilds exactly the damaged "
            "references with the bank's own recipe, then checks again."
        ),
    )
    verify.add_argument("bank", metavar="BANK", help="the bank folder (m3 build-memory's output)")
    verify.add_argument("--repair", action="store_true", help="rebuild the damaged references")
    verify.set_defaults(handler=_verify)


def _export(args: argparse.Namespace) -> int:
    from m3.inference.export import export_hf

    result = export_hf(args.run_folder, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {result.path} ({result.model_type}): {', '.join(result.files)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _add_export(verbs: Subparsers) -> None:
    export = verbs.add_parser(
        "export",
        help="write a trained stage as a Hugging Face checkpoint folder (warmup mode)",
        description=(
            "Write a finished `m3 fit` stage as config.json + model.safetensors (a Llama, "
            "Qwen2 or Qwen3 that transformers loads, computing the model without memory) and "
            "its Hugging Face tokenizer files; the memory settings are kept under the 'm3' key "
            "of config.json."
        ),
    )
    export.add_argument("run_folder", metavar="RUN_FOLDER", help="the stage's output folder")
    export.add_argument("out", metavar="OUT", help="the folder to write (missing or empty)")
    export.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="dtype of the stored weights (default: the model's)",
    )
    _add_overwrite(export, "replace a non-empty OUT folder")
    export.set_defaults(handler=_export)


_VERBS: list[Callable[[Subparsers], None]] = [
    _add_check,
    _add_recipes,
    _add_components,
    _add_run,
    _add_fit,
    _add_build_memory,
    _add_evaluate,
    _add_generate,
    _add_edit,
    _add_verify,
    _add_export,
    add_lm_eval_verb,
    _add_size,
    _add_smoke,
]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the `m3` command (no heavy imports).

    Returns:
        The parser; each sub-command stores its handler in the `handler` attribute.
    """
    parser = argparse.ArgumentParser(
        prog="m3",
        description="Memory³: language modeling with explicit memory.",
    )
    parser.add_argument("--version", action="version", version=f"m3 {__version__}")
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_verb in _VERBS:
        add_verb(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `m3` command.

    Args:
        argv: Arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        The exit status: 0 on success, 2 for a user error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Verb | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    # As `python -m` does: a recipe may name a class in a module of the current directory.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return handler(args)
    except UserError as error:
        print(f"m3: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m3: interrupted", file=sys.stderr)
        return 130
