"""`m3` on broken recipes: every verb that takes a recipe refuses it, and does nothing else.

The property test starts from the shipped recipes (the command on each one's first line, its
output moved into a fresh folder) and breaks them with one to three mutations: a value of
the wrong type, an unknown key (at the top, in a section, in a component's `init_args`, in a
pipeline's stage), a number out of range, a missing input file. The broken recipe is given
as `KEY=VALUE` overrides after the shipped files, as a YAML overlay after them, or as one
whole YAML file, to the verbs that read recipes, in-process. Each must exit with status 2,
name the broken key (or the missing file) in its message, print no traceback, and create or
change no file under the example's folder (its working directory, where `output` points):
recipes are checked before any work starts, and a verb that gets as far as claiming its run
folder, running a stage or generating fails the test at once (`no_work`).

The mutations are invalid by construction, from the schema's documented types and ranges
(`CATALOG`, `COMPONENT_CATALOG`), never by asking m3 which values it rejects; wrong values
include a list that contains itself and lists nested too deep for any recipe. Files that only
the verb reading them checks (`training.init_weights`, a tokenizer file, `retrieval.bank`,
`evaluation.cloze`) go to that verb alone: `m3 check` does not report them (see the xfail
tests at the end).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import os
import shlex
import stat
import string
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from m3.cli import main
from m3.core import registry
from m3.core.runs import RunFolder
from m3.model.config import PRESETS, Config
from m3.recipes import (
    RECIPES_DIR,
    DataSection,
    Recipe,
    Stage,
    TrainerSection,
    TrainingSection,
    load_recipe,
    shipped_recipes,
)
from m3.recipes.loading import deep_merge

ROOT = RECIPES_DIR.parent
TINY = str(RECIPES_DIR / "tiny" / "base.yaml")
WARMUP = str(RECIPES_DIR / "tiny" / "warmup.yaml")

#: Stands for the example's own folder in generated paths (replaced before running).
HERE = "ZZHEREZZ"
#: Every example's recipe writes here, relative to the example's folder (its working directory).
OUTPUT = "out"

#: The verbs that read a recipe, and the options each needs besides it.
VERBS = ("check", "fit", "build-memory", "evaluate", "generate", "run", "size", "edit")
VERB_OPTIONS = {"generate": ["--prompt", "x"], "edit": ["--delete", "0"]}

#: Shipped recipes that name data living on a cluster (and, for the pretrained overlays, real
#: checkpoints): they do not load here, unbroken (tests/test_pretrained_recipes.py checks
#: the overlays on stand-ins).
CLUSTER = {"paper-2.4b/warmup.yaml", "paper-2.4b/continual.yaml"} | {
    f"pretrained/{path.name}" for path in (ROOT / "recipes" / "pretrained").glob("*.yaml")
}

#: An evaluate stage on the tiny model (no recipe ships one).
EVALUATE = {
    "stage": "evaluate",
    "model": {"block_size": 128},
    "training": {"init_weights": "runs/tiny/continual/model.pt"},
    "retrieval": {"bank": "runs/tiny/bank"},
    "evaluation": {
        "cloze": "data/cloze.jsonl",
        "heldout": [
            {
                "class_path": "world",
                "init_args": {"split": "heldout", "n_people": 240, "n_places": 80, "n_orgs": 80},
            }
        ],
    },
}


# ---------------------------------------------------------------------------------------
# Plain values: paths into them, YAML text of them


def flow(value: Any) -> str:
    """A value as one line of YAML, as a `KEY=VALUE` override reads it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def nest(path: Sequence[str], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


def get_in(data: Any, path: Sequence[Any]) -> Any:
    for key in path:
        if isinstance(key, int):
            data = data[key] if isinstance(data, list) and key < len(data) else None
        else:
            data = data.get(key) if isinstance(data, Mapping) else None
    return data


def set_in(data: dict[str, Any], path: Sequence[Any], value: Any) -> None:
    """Set a value, making the mappings on its way (replacing what is not one)."""
    node: Any = data
    for key, after in itertools.pairwise(path):
        if isinstance(key, int):  # (an index only where the list is)
            node = node[key]
            continue
        if not isinstance(node.get(key), list if isinstance(after, int) else dict):
            assert isinstance(after, str), f"no list at {key!r} of {path}"
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def flatten(layer: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    """A layer as `KEY=VALUE` overrides (mappings key by key, other values whole)."""
    items = []
    for key, value in layer.items():
        if isinstance(value, Mapping) and value:
            items += flatten(value, (*prefix, key))
        else:
            items.append(f"{'.'.join((*prefix, key))}={flow(value)}")
    return items


def dict_nodes(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(data, dict):
        yield path, data
        for key, value in data.items():
            yield from dict_nodes(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from dict_nodes(value, (*path, i))


def first_list_index(path: Sequence[Any]) -> int:
    return next((i for i, key in enumerate(path) if isinstance(key, int)), len(path))


# ---------------------------------------------------------------------------------------
# The recipes to break


@dataclass(frozen=True)
class Base:
    """A shipped recipe, as its command loads it.

    Attributes:
        name: The recipe, relative to `recipes/`.
        verb: The verb of its command.
        files: The recipe files of its command (absolute paths).
        extra: What the command sets after the files (its `KEY=VALUE`), as one layer.
        tree: The checked recipe as plain values, with `output: out`.
        config: Its model's configuration.
    """

    name: str
    verb: str
    files: tuple[str, ...]
    extra: Mapping[str, Any]
    tree: dict[str, Any] = field(repr=False)
    config: Config = field(repr=False)

    @property
    def pipeline(self) -> bool:
        return self.tree.get("stage") == "pipeline"

    def overrides(self) -> list[str]:
        return [*flatten(self.extra), f"output={OUTPUT}"]

    def __str__(self) -> str:
        return self.name


def _base(name: str, verb: str, files: list[str], extra: Mapping[str, Any]) -> Base:
    with registry.input_files_unchecked():  # (the files are looked for in each example's folder)
        recipe = load_recipe(files, [*flatten(extra), f"output={OUTPUT}"])
    return Base(name, verb, tuple(files), extra, recipe.to_dict(), recipe.model.config())


def _bases() -> list[Base]:
    bases = []
    for shipped in shipped_recipes():
        name = shipped.path.relative_to(RECIPES_DIR).as_posix()
        if name in CLUSTER:
            continue
        verb, *words = shlex.split(shipped.command)[1:]
        items = [w for w in words if not w.startswith("-")]
        files = [str(ROOT / w) for w in items if "=" not in w]
        extra: dict[str, Any] = {}
        for item in (w for w in items if "=" in w):
            key, _, text = item.partition("=")
            extra = deep_merge(extra, nest(key.split("."), yaml.safe_load(text)))
        bases.append(_base(name, verb, files, extra))
    bases.append(
        _base("tiny/evaluate (tiny/base.yaml + an evaluate stage)", "evaluate", [TINY], EVALUATE)
    )
    return bases


BASES = _bases()


# ---------------------------------------------------------------------------------------
# What is invalid: the schema's types and ranges, written out


@dataclass(frozen=True)
class Key:
    """A key of a recipe (or of a component's `init_args`) and what it accepts.

    Attributes:
        path: Where it is.
        kind: What it holds: int, float, str, bool, choice, list, section, component,
            components, stages, devices (Lightning's), pair (training.betas).
        ge, gt, le, lt: Its range, for a number.
        choices: The values of a choice.
        finite: Whether its range also requires a finite number.
        typed: Whether a value of another type is refused (not for Lightning options whose
            annotation admits classes, which m3 cannot check).
        late: Whether its range is checked only once the rest of the recipe passes (the
            bank's quantizer is built once every other check passed).
    """

    path: tuple[str, ...]
    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    finite: bool = True
    typed: bool = True
    late: bool = False

    @property
    def ranged(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def fits(self, value: float) -> bool:
        if value != value or (self.finite and value in (float("inf"), float("-inf"))):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )


def K(path: str, kind: str, **how: Any) -> Key:
    return Key(tuple(path.split(".")), kind, **how)


_POSITIVE = (
    "vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "mlp_hidden",
    "block_size", "memory_tokens", "memories_per_chunk", "chunk_length", "reference_length",
)  # fmt: skip
_PRECISIONS = tuple(
    a for part in get_args(TrainerSection.hint("precision")) for a in get_args(part)
)

#: The keys of a recipe (and of a pipeline's stage), with their types and ranges.
CATALOG: list[Key] = [
    K("seed", "int", ge=0, le=2**32 - 1),
    K("description", "str"),
    K("stage", "choice", choices=get_args(Stage)),
    K("output", "str"),
    K("model", "section"),
    K("model.preset", "choice", choices=tuple(PRESETS)),
    *(K(f"model.{name}", "int", ge=1) for name in _POSITIVE),
    K("model.context_offset", "int", ge=0),
    K("model.norm_eps", "float", gt=0, finite=False),
    K("model.rope_base", "float", gt=0, finite=False),
    K("model.init_std", "float"),
    K("model.norm", "choice", choices=("rmsnorm", "layernorm")),
    K("model.activation", "choice", choices=("silu", "gelu")),
    K("model.tie_embeddings", "bool"),
    K("model.memory_layers", "list"),
    *(K(name, "component") for name in ("tokenizer", "chunker", "encoder", "sparsifier")),
    K("embedder", "component"),
    K("data", "section"),
    *(K(f"data.{name}", "components") for name in ("train", "val", "knowledge")),
    K("data.val_fraction", "float", ge=0, lt=1),
    K("data.seq_length", "int", ge=1),
    K("data.batch_size", "int", ge=1),
    K("data.num_workers", "int", ge=0),
    K("data.threshold", "float", ge=0, le=1),
    K("data.candidates", "int", ge=1),
    K("data.pairing_file", "str"),
    K("training", "section"),
    K("training.lr", "float", gt=0),
    K("training.weight_decay", "float", ge=0),
    K("training.betas", "pair"),
    K("training.schedule", "choice", choices=("wsd", "cosine", "constant")),
    K("training.warmup_steps", "int", ge=0),
    K("training.decay_fraction", "float", ge=0, le=1),
    K("training.min_lr_ratio", "float", ge=0, le=1),
    K("training.window", "int", ge=1),
    K("training.encode", "choice", choices=("grad", "no_grad", "store")),
    K("training.init_weights", "str"),
    K("training.memories", "str"),
    K("trainer", "section"),
    K("trainer.max_steps", "int", ge=1),
    K("trainer.num_nodes", "int", ge=1),
    K("trainer.accumulate_grad_batches", "int", ge=1),
    K("trainer.gradient_clip_val", "float", ge=0),
    K("trainer.log_every_n_steps", "int", ge=1),
    K("trainer.limit_val_batches", "float", ge=0),
    # (a str or a timedelta too: only its numbers are checked)
    K("trainer.val_check_interval", "float", gt=0, typed=False),
    K("trainer.precision", "choice", choices=_PRECISIONS),
    K("trainer.devices", "devices"),
    K("trainer.enable_progress_bar", "bool"),
    K("trainer.max_epochs", "int"),
    K("trainer.min_steps", "int"),
    K("trainer.inference_mode", "bool"),
    K("trainer.detect_anomaly", "bool"),
    K("trainer.reload_dataloaders_every_n_epochs", "int"),
    K("retrieval", "section"),
    K("retrieval.bank", "str"),
    K("retrieval.k", "int", ge=1),
    K("retrieval.threshold", "float", ge=0, le=1),
    K("retrieval.overfetch", "int", ge=1),
    K("retrieval.cache_size", "int", ge=0),
    K("generation", "section"),
    K("generation.max_new_tokens", "int", ge=1),
    K("generation.mode", "choice", choices=("memory", "none", "rag")),
    K("generation.temperature", "float", ge=0),
    K("generation.top_k", "int", ge=1),
    K("generation.top_p", "float", gt=0, le=1),
    K("bank", "section"),
    K("bank.dtype", "choice", choices=("float32", "bfloat16", "float16")),
    K("bank.batch_size", "int", ge=1),
    K("bank.index", "component"),
    K("bank.quantizer", "component"),
    K("bank.quantizer_file", "str"),
    K("bank.train_references", "int", ge=1),
    K("world", "section"),
    K("world.seed", "int", ge=0),
    *(K(f"world.{name}", "int", ge=1) for name in ("n_people", "n_places", "n_orgs")),
    K("world.background_seed", "int", ge=0),
    K("world.stdlib_chars", "int", ge=0),
    K("world.n_questions", "int", ge=1),
    K("world.n_edits", "int", ge=0),
    K("evaluation", "section"),
    K("evaluation.cloze", "str"),
    K("evaluation.heldout", "components"),
    K("evaluation.n_questions", "int", ge=1),
    K("evaluation.seq_length", "int", ge=1),
    K("evaluation.max_sequences", "int", ge=1),
    K("evaluation.batch_size", "int", ge=1),
    K("evaluation.protocols", "list"),
    K("evaluation.edits", "str"),
    K("evaluation.n_edits", "int", ge=1),
    K("evaluation.without_memory", "choice", choices=("empty", "warmup")),
    K("evaluation.generation", "section"),
    K("evaluation.generation.n_questions", "int", ge=1),
    K("evaluation.generation.max_new_tokens", "int", ge=1),
    K("evaluation.generation.batch_size", "int", ge=1),
    K("evaluation.generation.modes", "list"),
]

_BITS = {"ge": 1, "le": 16, "late": True}
#: The `init_args` of the components the shipped recipes name, by class_path.
COMPONENT_CATALOG: dict[str, list[Key]] = {
    "fixed": [K("max_tokens", "int", ge=1)],
    "hashed_ngram": [
        K("dim", "int", ge=1),
        K("ngrams", "list"),
        K("lowercase", "bool"),
        K("segmentation", "choice", choices=("unicode", "words")),
    ],
    "world": [
        K("split", "choice", choices=("train", "heldout", "kb")),
        K("seed", "int", ge=0),
        *(K(name, "int", ge=1) for name in ("n_people", "n_places", "n_orgs")),
    ],
    "files": [K("paths", "list"), K("text_field", "str")],
    "hf": [
        K("train_files", "list"),
        K("vocab_size", "int"),
        K("min_frequency", "int"),
        K("cache", "str"),
        K("bos_token", "str"),
        K("eos_token", "str"),
    ],
    "composite": [
        K("opq_subspaces", "int", ge=1, late=True),
        K("opq_bits", "int", **_BITS),
        K("opq_iterations", "int", ge=1, late=True),
        K("coarse", "choice", choices=("multi_index", "residual")),
        K("coarse_codes", "int", ge=0, late=True),
        K("coarse_bits", "int", **_BITS),
        K("pq_subspaces", "int", ge=1, late=True),
        K("pq_bits", "int", **_BITS),
    ],
}


def _known_names() -> frozenset[str]:
    # every key a recipe has anywhere: a new name must be none of them to be unknown
    names = {"preset", "class_path", "init_args", *(f.name for f in fields(Config))}
    stack: list[Any] = [Recipe]
    while stack:
        schema = stack.pop()
        for f in fields(schema):
            names.add(f.name)
            stack += [a for a in get_args(f.type) if is_dataclass(a)]
    for section in (DataSection, TrainingSection, TrainerSection):
        names.update(section.options(), section.provided)
    for kind in registry.KINDS:
        for cls in registry.available(kind).values():
            with contextlib.suppress(TypeError, ValueError):
                names.update(inspect.signature(cls).parameters)
    for base in BASES:
        for _, node in dict_nodes(base.tree):
            names.update(node)
    return frozenset(names)


KNOWN = _known_names()


# ---------------------------------------------------------------------------------------
# Strategies: one mutation, then a broken run


@dataclass(frozen=True)
class Mutation:
    """One thing broken in a recipe.

    Attributes:
        what: "wrong type", "unknown key", "out of range" or "missing file".
        path: Where, in the recipe's plain values (list items by index).
        value: The new value.
        names: What the error must mention: the key's name, or each missing file.
        alone: Reported only when it is the only problem (a cross-check that runs once
            the rest passed), or hiding the others (a file that cannot be read): so it is
            the one mutation of its recipe.
        verbs: The verbs that read it, when only they check it (files the schema does not
            type as inputs); None: every verb that reads a recipe.
    """

    what: str
    path: tuple[Any, ...]
    value: Any
    names: tuple[str, ...]
    alone: bool = False
    verbs: tuple[str, ...] | None = None

    @property
    def unit(self) -> tuple[Any, ...]:
        # at most one mutation per section (or per section of a stage)
        return self.path[:3] if self.path[0] == "stages" else self.path[:1]


TEXT = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8)
INTS = st.integers(min_value=-(2**40), max_value=2**40)
FLOATS = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _recursive() -> list[Any]:
    value: list[Any] = []
    value.append(value)  # YAML writes it `&id001 [*id001]`
    return value


#: Values no recipe can hold, of any type: a list that contains itself, lists nested deeper
#: than recipes may nest (`m3.recipes.loading.MAX_DEPTH`). A file holding one cannot be read.
STRUCTURAL = st.one_of(st.integers(33, 80).map(_nested), st.builds(_recursive))
MAPPINGS = st.builds(lambda k, v: {k: v}, TEXT, st.integers(0, 9))  # (dictionaries() rejects)
INT_LISTS = st.lists(st.integers(0, 9), min_size=1, max_size=3)


def wrong_types(key: Key) -> st.SearchStrategy[Any]:
    """Values of another type than the key takes."""
    not_a_choice = st.one_of(TEXT, INTS).filter(lambda v: v not in key.choices)
    return {
        "int": st.one_of(TEXT, FLOATS, st.booleans(), INT_LISTS, MAPPINGS),
        "float": st.one_of(TEXT, st.booleans(), st.lists(FLOATS, min_size=1, max_size=2), MAPPINGS),
        "str": st.one_of(INTS, FLOATS, st.booleans(), st.lists(TEXT, min_size=1), MAPPINGS),
        "bool": st.one_of(TEXT, INTS, st.lists(st.booleans(), min_size=1), MAPPINGS),
        "choice": st.one_of(not_a_choice, st.lists(TEXT, min_size=1, max_size=2)),
        "list": st.one_of(TEXT, INTS, MAPPINGS),
        "section": st.one_of(TEXT, INTS, INT_LISTS),
        # (not text: a bare name is short for {class_path: name})
        "component": st.one_of(
            INTS, st.booleans(), INT_LISTS, st.builds(lambda i: {"class_path": i}, INTS)
        ),
        "components": st.one_of(TEXT, INTS, MAPPINGS, st.just([]), INT_LISTS),
        "stages": st.one_of(TEXT, INTS, INT_LISTS),
        "devices": st.one_of(
            FLOATS.filter(lambda v: v != int(v)), MAPPINGS, st.lists(TEXT, min_size=1)
        ),
        "pair": st.one_of(TEXT, INTS, MAPPINGS, st.lists(TEXT, min_size=2, max_size=2)),
    }[key.kind]


def out_of_range(key: Key, config: Config) -> st.SearchStrategy[Any] | None:
    """Values of the key's type outside what it accepts, or None when every value fits."""
    name = key.path[-1]
    if key.kind == "list" and name == "memory_layers":
        layers = config.n_layer
        return st.one_of(
            st.integers(layers, layers + 100).map(lambda i: [i]),
            st.integers(-100, -1).map(lambda i: [i]),
            st.just([1, 0]),
            st.just([0, 0]),
        )
    if key.kind == "list" and name == "ngrams":
        return st.one_of(st.just([]), st.lists(st.integers(-9, 0), min_size=1, max_size=2))
    if key.kind == "pair":
        beta = st.floats(min_value=0, max_value=1, exclude_max=True)
        bad = st.one_of(
            st.floats(min_value=1, max_value=1e6), st.floats(max_value=0, exclude_max=True)
        )
        bad = st.one_of(bad, st.sampled_from([float("nan"), float("inf")]))
        return st.one_of(
            st.tuples(bad, beta).map(list),
            st.tuples(beta, bad).map(list),
            st.lists(beta, max_size=1),
            st.lists(beta, min_size=3, max_size=4),
        )
    if not key.ranged:
        return None
    if key.kind == "int":
        sides = []
        if key.path == ("model", "head_dim"):  # (rotary embeddings rotate pairs)
            sides.append(st.integers(0, 500).map(lambda i: 2 * i + 1))
        if key.path == ("model", "n_head") and config.n_kv_head > 1:
            kv = config.n_kv_head  # (query heads are grouped over the key/value heads)
            groups = st.tuples(st.integers(0, 20), st.integers(1, kv - 1))
            sides.append(groups.map(lambda t: t[0] * kv + t[1]))
        if key.ge is not None:
            sides.append(st.integers(max_value=int(key.ge) - 1))
        if key.le is not None:
            sides.append(st.integers(min_value=int(key.le) + 1))
        return st.one_of(sides)
    special = [float("nan")]
    if key.finite or key.ge is not None or key.gt is not None:
        special.append(float("-inf"))
    if key.finite or key.le is not None or key.lt is not None:
        special.append(float("inf"))
    sides = []
    if key.ge is not None:
        sides.append(st.floats(min_value=-1e12, max_value=key.ge, exclude_max=True))
    if key.gt is not None:
        sides.append(st.floats(min_value=-1e12, max_value=key.gt))
    if key.le is not None:
        sides.append(st.floats(min_value=key.le, max_value=1e12, exclude_min=True))
    if key.lt is not None:
        sides.append(st.floats(min_value=key.lt, max_value=1e12))
    outside = st.one_of(sides).filter(lambda v: not key.fits(v))  # (-0.0 is at least 0)
    return st.one_of(outside, st.sampled_from(special))


def missing_path() -> st.SearchStrategy[str]:
    name = st.text(alphabet=string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=10)
    relative = st.tuples(name, name).map(lambda t: f"missing_{t[0]}/{t[1]}.jsonl")
    absolute = name.map(lambda n: f"{HERE}/gone/{n}.txt")
    return st.one_of(relative, absolute)


@dataclass(frozen=True)
class Scope:
    """Where mutations go: the recipe itself, or one stage of a pipeline.

    Attributes:
        prefix: `()` or `("stages", name)`.
        view: The recipe that this scope's keys are read from (a stage: the pipeline's keys
            with the stage's merged over them).
        own: The stage's own keys (a list is changed only where the stage holds it).
    """

    prefix: tuple[str, ...]
    view: dict[str, Any]
    own: dict[str, Any] | None = None

    def reachable(self, path: tuple[Any, ...]) -> bool:
        cut = first_list_index(path)
        return self.own is None or cut == len(path) or get_in(self.own, path[: cut + 1]) is not None


def scopes(base: Base) -> list[Scope]:
    top = {k: v for k, v in base.tree.items() if k != "stages"}
    if not base.pipeline:
        return [Scope((), base.tree)]
    found = [Scope((), base.tree)]
    for name, keys in (base.tree.get("stages") or {}).items():
        found.append(Scope(("stages", name), deep_merge(top, keys), keys))
    return found


def catalog(scope: Scope) -> list[Key]:
    """The keys of a scope: the recipe's, and those of each component it names."""
    keys = [k for k in CATALOG if not (scope.prefix and k.path == ("stages",))]
    for path, node in dict_nodes(scope.view):
        if path[:1] == ("stages",) or not isinstance(node.get("class_path"), str):
            continue
        if not scope.reachable((*path, "init_args")):
            continue
        for key in COMPONENT_CATALOG.get(node["class_path"], []):
            keys.append(Key((*path, "init_args", *key.path), **_how(key)))
    return keys


def _how(key: Key) -> dict[str, Any]:
    return {f.name: getattr(key, f.name) for f in fields(Key) if f.name != "path"}


SCOPES = {base.name: scopes(base) for base in BASES}


@functools.cache
def mutations(b: int, s: int) -> st.SearchStrategy[Mutation]:
    """One mutation of the `s`-th scope of the `b`-th base."""
    base = BASES[b]
    scope = SCOPES[base.name][s]
    keys = catalog(scope)
    pre = scope.prefix

    def typed(key: Key) -> st.SearchStrategy[Mutation]:
        path, names = (*pre, *key.path), (key.path[-1],)
        return st.one_of(
            wrong_types(key).map(lambda v: Mutation("wrong type", path, v, names)),
            STRUCTURAL.map(lambda v: Mutation("wrong type", path, v, names, alone=True)),
        )

    def ranged(key: Key) -> st.SearchStrategy[Mutation]:
        values = out_of_range(key, base.config)
        assert values is not None
        return values.map(
            lambda v: Mutation("out of range", (*pre, *key.path), v, (key.path[-1],), key.late)
        )

    typed_keys = [k for k in keys if k.typed]
    ranged_keys = [k for k in keys if out_of_range(k, base.config) is not None]
    options = [
        st.sampled_from(typed_keys).flatmap(typed),
        st.sampled_from(ranged_keys).flatmap(ranged),
        unknown_keys(scope),
    ]
    if not base.pipeline:  # (m3 run checks a stage's inputs when the stage before it is done)
        options.append(missing_files(scope))
    # (not one_of(options): it would flatten the branches that are one_of themselves)
    return st.sampled_from(options).flatmap(lambda branch: branch)


def unknown_keys(scope: Scope) -> st.SearchStrategy[Mutation]:
    nodes = {
        path: free_mapping(path, node)
        for path, node in dict_nodes(scope.view)
        if path[:1] != ("stages",) and scope.reachable(path)
    }
    name = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True).filter(lambda n: n not in KNOWN)
    value = st.one_of(st.integers(0, 9), TEXT)
    return st.tuples(st.sampled_from(sorted(nodes, key=str)), name, value).map(
        lambda t: Mutation(
            "unknown key", (*scope.prefix, *t[0], t[1]), t[2], (t[1],), alone=nodes[t[0]]
        )
    )


def free_mapping(path: tuple[Any, ...], node: dict[str, Any]) -> bool:
    """A mapping that is one constructor argument (MilvusIndex's `index_params`).

    Its keys are the class's to check, when the part is built: for the bank's index, a
    cross-check that runs once the rest of the recipe passed.
    """
    return len(path) >= 2 and path[-2] == "init_args" and "class_path" not in node


def missing_files(scope: Scope) -> st.SearchStrategy[Mutation]:
    paths = st.lists(missing_path(), min_size=1, max_size=2).map(lambda p: list(dict.fromkeys(p)))

    def sources(where: str) -> st.SearchStrategy[Mutation]:
        def mutation(missing: list[str]) -> Mutation:
            value = [{"class_path": "files", "init_args": {"paths": missing}}]
            return Mutation("missing file", tuple(where.split(".")), value, tuple(missing))

        return paths.map(mutation)

    one = missing_path()
    return st.one_of(
        *(sources(w) for w in ("data.train", "data.knowledge", "data.val", "evaluation.heldout")),
        one.map(lambda p: Mutation("missing file", ("bank", "quantizer_file"), p, (p,))),
        one.map(
            lambda p: Mutation(
                "missing file",
                ("embedder",),
                {"class_path": "sentence", "init_args": {"path": p}},
                (p,),
            )
        ),
    )


def read_by_verbs(base: Base) -> st.SearchStrategy[Mutation] | None:
    """Files that only the verb reading them checks, for the recipes whose verb reads them."""
    stage = base.tree.get("stage")
    one = missing_path()

    def at(path: str, verbs: tuple[str, ...], wrap: Any = None) -> st.SearchStrategy[Mutation]:
        return one.map(
            lambda p: Mutation(
                "missing file", tuple(path.split(".")), wrap(p) if wrap else p, (p,), verbs=verbs
            )
        )

    def hf(argument: str, many: bool) -> Any:
        return lambda p: {"class_path": "hf", "init_args": {argument: [p] if many else p}}

    if stage == "warmup":
        return st.one_of(
            at("training.init_weights", ("fit",)),
            at("tokenizer", ("fit",), hf("path", False)),
            at("tokenizer", ("fit",), hf("train_files", True)),
        )
    if stage == "continual":
        return at("training.init_weights", ("fit",))
    if stage == "build_memory":
        return at("training.init_weights", ("build-memory",))
    if stage == "generate":
        return at("retrieval.bank", ("generate", "edit"))
    if stage == "evaluate":
        # (a missing bank or weights: see test_evaluate_with_a_missing_bank_writes_nothing)
        return at("evaluation.cloze", ("evaluate",))
    return None


@dataclass(frozen=True)
class Broken:
    """A broken recipe and how it is given to the verbs."""

    base: Base
    mutations: tuple[Mutation, ...]
    form: Literal["overrides", "overlay", "file"]
    verbs: tuple[str, ...]

    def tree(self) -> dict[str, Any]:
        tree = copy.deepcopy(self.base.tree)
        for m in self.mutations:
            set_in(tree, m.path, m.value)
        return tree

    def layer_items(self) -> list[tuple[tuple[str, ...], Any]]:
        # each mutation as a key (up to the first list) and the value there
        tree, items = self.tree(), []
        for m in self.mutations:
            cut = first_list_index(m.path)
            items.append(
                (m.path[:cut], get_in(tree, m.path[:cut]) if cut < len(m.path) else m.value)
            )
        return items

    def argv(self, verb: str, here: Path) -> list[str]:
        """The command line (written files go in `here`)."""
        options = list(VERB_OPTIONS.get(verb, []))
        if verb == "check" and self.base.pipeline:
            options.append("--no-file-checks")  # (as m3 run: its stages write their inputs)
        if self.form == "file":
            path = here / "broken.yaml"
            items = [str(path)]
            text = yaml.safe_dump(self.tree(), sort_keys=False, allow_unicode=True)
        elif self.form == "overlay":
            layer = deep_merge(self.base.extra, {"output": OUTPUT})
            for path_, value in self.layer_items():
                layer = deep_merge(layer, nest(path_, value))
            path = here / "overlay.yaml"
            items = [*self.base.files, str(path)]
            text = yaml.safe_dump(layer, sort_keys=False, allow_unicode=True)
        else:
            path, text = None, ""
            overrides = [f"{'.'.join(p)}={flow(v)}" for p, v in self.layer_items()]
            items = [*self.base.files, *self.base.overrides(), *overrides]
        if path is not None and not path.exists():
            path.write_text(text.replace(HERE, str(here)), encoding="utf-8")
        return [verb, *(i.replace(HERE, str(here)) for i in items), *options]

    def names(self, here: Path) -> list[str]:
        return [n.replace(HERE, str(here)) for m in self.mutations for n in m.names]


@st.composite
def broken_recipes(draw: st.DrawFn) -> Broken:
    b = draw(st.integers(0, len(BASES) - 1))
    base = BASES[b]
    form = draw(st.sampled_from(["overrides", "overlay", "file"]))
    by_verb = read_by_verbs(base)
    if by_verb is not None and draw(st.integers(0, 7)) == 0:
        m = draw(by_verb)
        assert m.verbs is not None
        return Broken(base, (m,), form, m.verbs)
    s = draw(st.integers(0, len(SCOPES[base.name]) - 1))
    drawn = draw(st.lists(mutations(b, s), min_size=1, max_size=3))
    alone = [m for m in drawn if m.alone]
    kept: list[Mutation] = []
    for m in alone[:1] or drawn:
        if all(m.unit != k.unit for k in kept):
            kept.append(m)
    others = [v for v in VERBS if v != base.verb]
    if any(m.what == "missing file" for m in kept):
        # (m3 run and check --no-file-checks leave input files to the stages that read them)
        others.remove("run")
    # (every verb loads a recipe alike: the recipe's own verb and one other, not all eight)
    return Broken(base, tuple(kept), form, (base.verb, draw(st.sampled_from(others))))


# ---------------------------------------------------------------------------------------
# Running the command, and what it left behind


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under a folder (the folder too): type, size and mtime in nanoseconds."""
    found = {}
    for where, folders, files in os.walk(root):
        for name in [".", *folders, *files] if where == str(root) else [*folders, *files]:
            path = os.path.join(where, name)
            info = os.lstat(path)
            found[os.path.relpath(path, root)] = (
                stat.S_IFMT(info.st_mode),
                info.st_size,
                info.st_mtime_ns,
            )
    return found


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """`contextlib.chdir`, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_cli(
    argv: list[str], here: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run `m3 ARGV` in-process from a folder: its status, stdout and stderr."""
    path = list(sys.path)  # (main puts the working directory on sys.path)
    capsys.readouterr()
    try:
        with working_directory(here):
            status = main(argv)
    except SystemExit as exited:
        pytest.fail(f"m3 {shlex.join(argv)}: exited {exited.code}: {capsys.readouterr().err}")
    except Exception:  # a crash: the traceback a user would see
        pytest.fail(f"m3 {shlex.join(argv)} crashed:\n{traceback.format_exc()}")
    finally:
        sys.path[:] = path
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop any verb at its first piece of work, as a failure (nothing is ever claimed)."""
    import m3.inference.generate
    import m3.pipeline

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("work started: the broken recipe was accepted")

    monkeypatch.setattr(RunFolder, "claim", refuse)
    monkeypatch.setattr(m3.pipeline, "_runner", lambda stage: refuse)
    monkeypatch.setattr(m3.inference.generate, "generate", refuse)


# ---------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("base", BASES, ids=str)
def test_every_base_loads_unbroken(base: Base) -> None:
    """The problems of a broken recipe are its mutations': the recipes load as they ship."""
    with tempfile.TemporaryDirectory() as here, working_directory(Path(here)):
        checks = registry.input_files_unchecked() if base.pipeline else contextlib.nullcontext()
        with checks:
            assert load_recipe(base.files, base.overrides()).to_dict() == base.tree


@settings(
    max_examples=250,
    deadline=None,
    # capsys and the no_work patches hold for every example; each has its own folder
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(broken=broken_recipes())
def test_broken_recipes_exit_2_naming_the_key_and_write_nothing(
    broken: Broken, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    event(f"base: {broken.base.name}")
    event(f"given as: {broken.form}")
    for m in broken.mutations:
        event(f"mutation: {m.what}{' (read by the verb)' if m.verbs else ''}")
    event(f"mutations: {len(broken.mutations)}")
    with tempfile.TemporaryDirectory(prefix="m3-broken-") as folder:
        here = Path(folder)
        for verb in broken.verbs:
            argv = broken.argv(verb, here)
            before = snapshot(here)
            status, out, err = run_cli(argv, here, capsys)
            command = f"m3 {shlex.join(argv)}\n{err}"
            assert status == 2, command
            assert err.startswith("m3: error: "), command
            assert "Traceback" not in err, command
            for name in broken.names(here):
                assert name in err, f"{name!r} is not named by {command}"
            assert out == "", command
            assert snapshot(here) == before, f"files written by {command}"
            assert not (here / OUTPUT).exists(), command


# --- regressions found by the property test ----------------------------------------------


def test_betas_out_of_range_or_not_two_are_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # AdamW raised (a traceback) after the run folder was written: training.betas is
    # Sequence[float] on Memory3Module, held to two numbers in [0, 1) by the recipe
    out = tmp_path / "out"
    for betas, problem in [
        ("[1.5, 0.9]", "training.betas[0]: must be less than 1, got 1.5"),
        ("[0.9, -0.1]", "training.betas[1]: must be at least 0, got -0.1"),
        ("[0.9]", "training.betas: expected 2 items, got 1"),
        ("[0.9, 0.95, 0.99]", "training.betas: expected 2 items, got 3"),
    ]:
        assert main(["fit", TINY, WARMUP, f"output={out}", f"training.betas={betas}"]) == 2
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err
        assert not out.exists()
    assert load_recipe([TINY, WARMUP], ["training.betas=[0, 0.999]"]).training.betas == [0, 0.999]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("world: &a {x: *a}\n", "world.x"),
        ("model: &a {preset: tiny, memory_layers: [*a]}\n", "model.memory_layers[0]"),
        ("description: &a [*a]\n", "description[0]"),
    ],
)
def test_a_value_that_contains_itself_is_refused(
    text: str, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a recursive YAML alias was a RecursionError (a traceback) wherever the recipe was walked
    (tmp_path / "r.yaml").write_text(text)
    assert main(["check", TINY, str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'r.yaml'}: {where} refers to itself (a recursive YAML alias)" in err
    assert main(["check", TINY, "world=&a [*a]"]) == 2
    err = capsys.readouterr().err
    assert "world[0]: refers to itself (a recursive YAML alias) (from the command line)" in err


def test_values_nested_too_deeply_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 100 levels of [ ] or { } read as YAML, then OmegaConf hit Python's recursion limit
    (tmp_path / "r.yaml").write_text("world: " + "{a: " * 100 + "1" + "}" * 100 + "\n")
    assert main(["check", TINY, str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'r.yaml'}: world{'.a' * 31} nests deeper than 32 levels" in err
    assert main(["check", TINY, "world=" + "[" * 100 + "]" * 100]) == 2
    err = capsys.readouterr().err
    assert f"world{'[0]' * 32}: nests deeper than 32 levels (from the command line)" in err
    shallow = "{a: " * 20 + "1" + "}" * 20  # (still nothing a recipe takes)
    assert main(["check", TINY, f"world={shallow}"]) == 2
    assert "world.a: unknown key" in capsys.readouterr().err


def test_an_override_that_cannot_be_read_is_blamed_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # it was said to come from the last file that sets the key (here tiny/base.yaml)
    assert main(["check", TINY, "chunker.class_path=..."]) == 2
    err = capsys.readouterr().err
    assert "chunker.class_path: cannot parse the value '...'" in err
    assert err.rstrip().endswith("(from the command line)") and f"(from {TINY})" not in err


# --- outstanding bugs (outside m3/recipes): what the verbs should do -----------------------

#: One cloze question, as `World.write` writes them.
CLOZE = (
    '{"prompt": "a", "options": ["b", "c"], "answer": 0, "entity": "e", "attribute": "x", '
    '"kb_ids": [0]}\n'
)


def test_evaluate_with_a_missing_bank_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cloze.jsonl").write_text(CLOZE)
    out = tmp_path / "out"
    argv = ["evaluate", TINY, "stage=evaluate", f"output={out}"]
    argv += [f"evaluation.cloze={tmp_path / 'cloze.jsonl'}", f"retrieval.bank={tmp_path}/none"]
    assert main(argv) == 2
    assert f"retrieval.bank: {tmp_path}/none does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_invalid_trainer_options_are_refused_before_the_run_folder_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["fit", TINY, WARMUP, f"output={out}", "trainer.max_steps=1", "trainer.devices=0"]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "trainer.devices" in err
    assert not out.exists()


@pytest.mark.xfail(
    strict=True,
    reason="these keys are not input paths to the schema (HFTokenizer's path: str | None, "
    "Memory3Module's init_weights: str | None, RetrievalSection.bank and "
    "EvaluationSection.cloze: str | None): m3 check accepts files that do not exist, "
    "which the verbs reading them refuse",
)
@pytest.mark.parametrize(
    "override",
    [
        "tokenizer={class_path: hf, init_args: {path: MISSING}}",
        "tokenizer={class_path: hf, init_args: {train_files: [MISSING]}}",
        "training.init_weights=MISSING",
        "retrieval.bank=MISSING",
        "evaluation.cloze=MISSING",
    ],
)
def test_check_reports_missing_files_that_the_verbs_read(
    override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.file")
    assert main(["check", "-q", TINY, override.replace("MISSING", missing)]) == 2
    assert missing in capsys.readouterr().err
