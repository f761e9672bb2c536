"""Recipes: load, merge, check and build what a YAML recipe describes.

A recipe is an OmegaConf YAML file. Several compose: files are merged in order, then
`key=value` overrides from the command line are applied, then `${...}` interpolations are
resolved, and then the whole result is checked against the schema below, so that every
problem (unknown keys, wrong types, unknown classes, bad constructor arguments, numbers out
of range, missing files) is reported at once, each with its key path, before any work.

```python
from m3.recipes import build, load_recipe

recipe = load_recipe(["recipes/tiny/base.yaml"], ["model.n_layer=6"])
config = recipe.model.config()          # an m3.model.config.Config
tokenizer = build(recipe, "tokenizer")  # an m3.data.tokenizer.Tokenizer
```

Adding a section is local: add a field to `Recipe`, either a nested dataclass for a group
of plain values, or a `ComponentSpec | None` field with `metadata={"kind": "<kind>"}` for
an interchangeable part.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Literal,
    NamedTuple,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from m3.core import registry
from m3.core.errors import UserError
from m3.core.registry import Bounds, ComponentSpec, Problem
from m3.model.config import PRESETS, Config

T = TypeVar("T")

#: What a recipe is for: `m3 fit` runs warmup and continual, `m3 build-memory` build_memory,
#: `m3 evaluate` evaluate, `m3 generate` generate; `world` (write the synthetic world and its
#: tokenizer) and `edit` (measure knowledge edits) run as stages of a `pipeline` (`m3 run`).
Stage = Literal[
    "world", "warmup", "continual", "build_memory", "evaluate", "generate", "edit", "pipeline"
]

#: Where the recipes shipped with m3 live (in a source checkout).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

_COMMAND_LINE = "the command line"


class RecipeError(UserError):
    """Everything wrong with a recipe, reported together.

    Args:
        problems: Each problem with its key path.
        sources: The recipe files (and overrides) the problems were found in.

    Attributes:
        problems: Each problem with its key path.
    """

    def __init__(self, problems: Sequence[Problem], *, sources: str = "the recipe") -> None:
        self.problems = list(problems)
        self.sources = sources
        count = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in {sources}:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); this one is rebuilt from its problems instead.
        return (functools.partial(RecipeError, sources=self.sources), (self.problems,))


@dataclass(frozen=True)
class ModelSpec:
    """The model section: a preset of `m3.model.config.Config` plus the fields it changes.

    In YAML the fields sit next to the preset (`model: {preset: tiny, n_layer: 6}`), and
    `${model.<field>}` interpolations see the preset's values.

    Attributes:
        preset: A preset name (`Config.presets()`).
        overrides: The fields that differ from the preset.
    """

    preset: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> Config:
        """Build the model configuration.

        Returns:
            `Config.from_name(preset, **overrides)`.
        """
        return Config.from_name(self.preset, **self.overrides)


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Where the text comes from and how it becomes training sequences (`m3.training.datamodule`).

    Attributes:
        train: Sources of training text (kind `source`), concatenated; training stages
            need them.
        val: Sources of held-out text; when None, `val_fraction` of the training
            sequences is held out.
        knowledge: Sources of the knowledge base (the continual stage pairs each training
            chunk with one of its references).
        val_fraction: Share of training sequences held out when `val` is None.
        seq_length: Tokens per training sequence after the BOS (the paper: 2048).
        batch_size: Sequences per batch (per device).
        num_workers: DataLoader worker processes.
        threshold: Leakage threshold of the reference pairing (the paper: 0.9).
        candidates: Search hits tried per chunk when pairing.
        pairing_file: Where the pairing is cached (default: in the run folder).
    """

    train: list[ComponentSpec] | None = field(default=None, metadata={"kind": "source"})
    val: list[ComponentSpec] | None = field(default=None, metadata={"kind": "source"})
    knowledge: list[ComponentSpec] | None = field(default=None, metadata={"kind": "source"})
    val_fraction: Annotated[float, Bounds(ge=0, lt=1)] = 0.05
    seq_length: Annotated[int, Bounds(ge=1)] = 256
    batch_size: Annotated[int, Bounds(ge=1)] = 8
    num_workers: Annotated[int, Bounds(ge=0)] = 0
    threshold: Annotated[float, Bounds(ge=0, le=1)] = 0.9
    candidates: Annotated[int, Bounds(ge=1)] = 8
    pairing_file: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrainingSection:
    """Optimisation settings of a training stage (`m3.training.module.Memory3Module`).

    Attributes:
        lr: Peak learning rate (the paper: ≈ 8e-4 warmup, ≈ 5e-5 continual).
        weight_decay: AdamW weight decay of the weight matrices: the attention and MLP
            projections and an untied `lm_head`. The token embedding gets none, nor does
            the `lm_head` when `model.tie_embeddings` makes it the same tensor, nor any
            parameter of fewer than two dimensions (the norms' weights).
        betas: AdamW betas.
        schedule: "wsd" (warmup-stable-decay), "cosine" or "constant".
        warmup_steps: Linear warmup steps.
        decay_fraction: Share of the steps in the final decay of "wsd".
        min_lr_ratio: Final learning rate as a fraction of `lr`.
        window: Chunks whose references a chunk reads (the paper: 5).
        encode: How the continual stage gets its references' memories. "grad": encoded on
            the fly by the current weights, gradients flowing through the selected keys and
            values (the paper's setting; ≈ 2× a warmup step); "no_grad": encoded on the fly,
            forward-only (≈ 1.3×); "store": read from the bank named by `memories` and not
            encoded at all (the paper's "frozen" option: the memories stay those of the
            weights that built the bank while training changes the weights).
        memories: With `encode: store`, and only then: the bank folder `m3 build-memory`
            wrote from the same knowledge base, chunker and tokenizer, with the weights
            `init_weights` names. `m3 fit` checks all of that before training.
        init_weights: Weights to start from: a stage's `model.pt` or `.ckpt`, or a Hugging
            Face Llama-family folder; a continual stage must name them, or say "random" to
            train with memory from random weights (the paper's Figure 11 comparison).
    """

    lr: Annotated[float, Bounds(gt=0)] = 8e-4
    weight_decay: Annotated[float, Bounds(ge=0)] = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: Annotated[int, Bounds(ge=0)] = 100
    decay_fraction: Annotated[float, Bounds(ge=0, le=1)] = 0.1
    min_lr_ratio: Annotated[float, Bounds(ge=0, le=1)] = 0.0
    window: Annotated[int, Bounds(ge=1)] = 5
    encode: Literal["grad", "no_grad", "store"] = "grad"
    memories: str | None = None
    init_weights: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrainerSection:
    """Options of Lightning's `Trainer` (the same names); DDP/FSDP need no code change.

    Attributes:
        max_steps: Optimiser steps of the stage.
        accelerator: "cpu", "gpu", "auto", …
        devices: Device count, list of indices, or "auto".
        num_nodes: Machines.
        strategy: "auto", "ddp", "fsdp", …
        precision: "32-true", "bf16-mixed", "16-mixed", … (Lightning's default when None).
        accumulate_grad_batches: Batches per optimiser step (the paper: ~4M tokens a step).
        gradient_clip_val: Gradient-norm clipping (None: off).
        val_check_interval: Validate every this many steps (int) or fraction of an epoch.
        limit_val_batches: Held-out batches per validation (int) or fraction.
        log_every_n_steps: Logging interval.
        enable_progress_bar: Show Lightning's progress bar.
        deterministic: Ask torch for deterministic algorithms.
    """

    max_steps: Annotated[int, Bounds(ge=1)] = 1000
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: Annotated[int, Bounds(ge=1)] = 1
    strategy: str = "auto"
    precision: str | None = None
    accumulate_grad_batches: Annotated[int, Bounds(ge=1)] = 1
    gradient_clip_val: Annotated[float, Bounds(ge=0)] | None = 1.0
    val_check_interval: Annotated[float, Bounds(gt=0)] | None = None
    limit_val_batches: Annotated[float, Bounds(ge=0)] | None = None
    log_every_n_steps: Annotated[int, Bounds(ge=1)] = 10
    enable_progress_bar: bool = True
    deterministic: bool | None = None

    def to_kwargs(self) -> dict[str, Any]:
        """The options as `Trainer` keyword arguments (unset ones left to Lightning)."""
        kwargs = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if isinstance(self.val_check_interval, int):
            # validate every N steps across epochs, even when an epoch is shorter than N
            kwargs["check_val_every_n_epoch"] = None
        return kwargs


@dataclass(frozen=True, kw_only=True)
class WorldSection:
    """The synthetic world that a `world` stage writes (`m3.data.world.World`, `m3.pipeline`).

    Attributes:
        seed: Seed of the world whose facts the knowledge base holds.
        n_people: People in the world.
        n_places: Places in the world.
        n_orgs: Organisations in the world.
        background_seed: Seed of a second world whose open-book text (each training
            document after its entities' knowledge-base documents), with standard-library
            English, is the warmup stage's general text, so that the first world's facts are
            new to the model; null: no second world.
        stdlib_chars: Characters of standard-library English (docstrings, pydoc topics).
        n_questions: Cloze questions written; null: one per held-out entity.
        n_edits: Knowledge edits written (`World.edits`).
    """

    seed: Annotated[int, Bounds(ge=0)] = 0
    n_people: Annotated[int, Bounds(ge=1)] = 2400
    n_places: Annotated[int, Bounds(ge=1)] = 800
    n_orgs: Annotated[int, Bounds(ge=1)] = 800
    background_seed: Annotated[int, Bounds(ge=0)] | None = 1
    stdlib_chars: Annotated[int, Bounds(ge=0)] = 400_000
    n_questions: Annotated[int, Bounds(ge=1)] | None = None
    n_edits: Annotated[int, Bounds(ge=0)] = 100


@dataclass(frozen=True, kw_only=True)
class EvaluationSection:
    """What `m3 evaluate` scores (`m3.inference.evaluate`), and the edits an `edit` stage tries.

    Attributes:
        cloze: A JSONL file of multiple-choice cloze questions (`prompt`, `options`,
            `answer`; `World.write` writes `cloze.jsonl`).
        heldout: Sources of held-out text scored for loss, perplexity and accuracy.
        n_questions: Questions asked (the first ones); null: all.
        seq_length: Tokens per held-out window after its `<s>`.
        max_sequences: Most held-out windows scored.
        batch_size: Sequences (or cloze questions) per forward pass.
        protocols: Retrieval protocols of held-out text: "paper" (each chunk retrieves with
            its own text), "causal" (with the text before it).
        edits: A JSONL file of knowledge edits (`World.write` writes `edits.jsonl`).
        n_edits: Edits tried (the first ones); null: all.
        without_memory: How the `none` mode reads the model: "empty" (memory mode with no
            memories: the same model reading nothing, for a model trained with memory) or
            "warmup" (warmup mode: no reference prefix, for a model trained without memory).
    """

    cloze: str | None = None
    heldout: list[ComponentSpec] | None = field(default=None, metadata={"kind": "source"})
    n_questions: Annotated[int, Bounds(ge=1)] | None = None
    seq_length: Annotated[int, Bounds(ge=1)] = 256
    max_sequences: Annotated[int, Bounds(ge=1)] = 64
    batch_size: Annotated[int, Bounds(ge=1)] = 16
    protocols: list[Literal["paper", "causal"]] = field(default_factory=lambda: ["paper", "causal"])
    edits: str | None = None
    n_edits: Annotated[int, Bounds(ge=1)] | None = None
    without_memory: Literal["empty", "warmup"] = "empty"


@dataclass(frozen=True, kw_only=True)
class RetrievalSection:
    """How inference reads a memory bank (`m3.retrieval.Retriever`, `m3.inference.generate`).

    Attributes:
        bank: The bank folder that `m3 build-memory` wrote; its model, tokenizer and
            embedder fingerprints are checked against the recipe's when it is opened.
        k: Memories per 64-token chunk, and references of the RAG baseline (the paper: 5).
        threshold: Leakage threshold on Eq. 6's overlap (evaluation: 2/3); null turns the
            filter off.
        overfetch: Candidates searched per chunk, as a multiple of `k`.
        cache_size: References whose decoded memories the RAM cache keeps; 0 turns it off.
    """

    bank: str | None = None
    k: Annotated[int, Bounds(ge=1)] = 5
    threshold: Annotated[float, Bounds(ge=0, le=1)] | None = 2 / 3
    overfetch: Annotated[int, Bounds(ge=1)] = 3
    cache_size: Annotated[int, Bounds(ge=0)] = 4096


@dataclass(frozen=True, kw_only=True)
class BankSection:
    """How `m3 build-memory` writes a memory bank (`m3.bank.build.build_memory`).

    Attributes:
        dtype: Dtype of the stored keys and values; of the decoded ones when quantized.
        batch_size: References per forward pass.
        index: The search index over the references' embeddings (kind `index`); m3 sets
            its `dim` (the embedder's). None: `ExactIndex`, or `ScannIndex` above 200,000
            references.
        quantizer: Vector quantizer of every stored key and value vector (kind
            `quantizer`, e.g. `composite` for the paper's 14-byte codes); m3 sets its `dim`
            (the model's `head_dim`). Keys and values get separately trained copies, trained
            on the memories of `train_references` references sampled uniformly with the
            recipe's seed. None: raw vectors in `dtype`.
        quantizer_file: A saved `MemoryQuantizer` (`MemoryQuantizer.save`, or another
            bank's `quantizer.pt`) to use instead of training one.
        train_references: References whose memories train the quantizer.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: Annotated[int, Bounds(ge=1)] = 64
    index: ComponentSpec | None = field(
        default=None, metadata={"kind": "index", "provided": ("dim",)}
    )
    quantizer: ComponentSpec | None = field(
        default=None, metadata={"kind": "quantizer", "provided": ("dim",)}
    )
    quantizer_file: registry.InputPath | None = None
    train_references: Annotated[int, Bounds(ge=1)] = 1024


def bank_quantizer(recipe: Recipe) -> Any:
    """The vector quantizer a recipe's `bank` section names, untrained, or None.

    Args:
        recipe: A checked recipe.

    Returns:
        A `m3.memory.quantize.VectorQuantizer` of the model's head dimension built from
        `bank.quantizer`; None when the recipe names none (or only `bank.quantizer_file`).
    """
    if recipe.bank is None or recipe.bank.quantizer is None:
        return None
    return registry.instantiate(
        "quantizer", recipe.bank.quantizer, dim=recipe.model.config().head_dim
    )


def _check_bank(recipe: Recipe) -> list[Problem]:
    """Cross-checks of the bank section that need the model (run after the schema)."""
    bank = recipe.bank
    if bank is None:
        return []
    problems = []
    if bank.quantizer is not None and bank.quantizer_file is not None:
        message = "give either bank.quantizer (trained by the build) or bank.quantizer_file"
        problems.append(Problem("bank.quantizer_file", message))
    if bank.quantizer is not None:
        try:
            bank_quantizer(recipe)
        except UserError as err:
            detail = str(err).split("\n")[-1].strip()
            problems.append(Problem("bank.quantizer.init_args", f"rejected: {detail}"))
    return problems


@dataclass(frozen=True, kw_only=True)
class GenerationSection:
    """Decoding settings of `m3 generate` (`m3.inference.generate.generate`).

    Attributes:
        max_new_tokens: Most tokens generated per prompt.
        mode: "memory" (explicit memories, swapped every chunk), "none" (the same model
            without memories) or "rag" (the `retrieval.k` references as text before the
            prompt, no memories).
        temperature: Softmax temperature; 0 decodes greedily.
        top_k: Sample among the `top_k` most likely tokens only; null: all.
        top_p: Sample among the most likely tokens whose probabilities sum to `top_p`
            (nucleus sampling); null: all.
    """

    max_new_tokens: Annotated[int, Bounds(ge=1)] = 128
    mode: Literal["memory", "none", "rag"] = "memory"
    temperature: Annotated[float, Bounds(ge=0)] = 0.0
    top_k: Annotated[int, Bounds(ge=1)] | None = None
    top_p: Annotated[float, Bounds(gt=0, le=1)] | None = None


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A checked recipe.

    Attributes:
        description: One line saying what the recipe does.
        stage: What the recipe runs, or None for a recipe that only describes parts.
        seed: Seed of every random generator (within Lightning's range, 0..2³²−1).
        model: The model configuration.
        tokenizer: The tokenizer (kind `tokenizer`), or None.
        chunker: How documents are cut into references (kind `chunker`), or None.
        output: The run folder this recipe's stage writes to.
        data: The text and how it becomes sequences, or None.
        training: Optimisation settings of a training stage.
        trainer: Lightning `Trainer` options.
        encoder: Encodes references into memories (kind `encoder`).
        sparsifier: Keeps the top tokens of each memory (kind `sparsifier`).
        embedder: Embeds chunks and references for retrieval (kind `embedder`).
        retrieval: Which memory bank inference reads, and how (`m3 generate`).
        generation: Decoding settings of `m3 generate`.
        bank: How `m3 build-memory` writes the bank: dtype, batch size, index, quantizer.
        world: The synthetic world a `world` stage writes.
        evaluation: What `m3 evaluate` scores.
        stages: The stages of a `pipeline` recipe, in order (`m3 run`): stage name -> the
            recipe keys merged over the pipeline recipe (without `stages`) to give the
            stage's own recipe, which must set `stage`; its outputs go to
            `<output>/<name>` unless it sets `output`. Being a mapping, a stage's keys can
            be changed from the command line: `stages.warmup.trainer.max_steps=50`.
    """

    description: str = ""
    stage: Stage | None = None
    seed: Annotated[int, Bounds(ge=0, le=2**32 - 1)] = 0
    model: ModelSpec
    tokenizer: ComponentSpec | None = field(default=None, metadata={"kind": "tokenizer"})
    chunker: ComponentSpec | None = field(default=None, metadata={"kind": "chunker"})
    output: str = "runs/m3"
    data: DataSection | None = None
    training: TrainingSection = field(default_factory=TrainingSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    encoder: ComponentSpec | None = field(default=None, metadata={"kind": "encoder"})
    sparsifier: ComponentSpec | None = field(default=None, metadata={"kind": "sparsifier"})
    embedder: ComponentSpec | None = field(default=None, metadata={"kind": "embedder"})
    retrieval: RetrievalSection | None = None
    generation: GenerationSection | None = None
    bank: BankSection | None = None
    world: WorldSection | None = None
    evaluation: EvaluationSection | None = None
    stages: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain values; loading them again gives the same recipe."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        """The recipe as YAML text; loading it again gives the same recipe."""
        text = yaml.safe_dump(
            _escape(self.to_dict()), sort_keys=False, allow_unicode=True, width=1000
        )
        return text


def build(recipe: Recipe, section: str, /, **extra: Any) -> Any:
    """Build the component that a section of a recipe names.

    Args:
        recipe: A checked recipe.
        section: The name of a component field, e.g. `"tokenizer"`.
        **extra: Constructor arguments that the calling code supplies.

    Returns:
        The component.

    Raises:
        RecipeError: When the recipe has no such section.
        UserError: When the component cannot be built.
    """
    fields = {f.name: f for f in dataclasses.fields(recipe)}
    kind = fields[section].metadata.get("kind") if section in fields else None
    if kind is None:
        names = [name for name, f in fields.items() if "kind" in f.metadata]
        raise RecipeError([Problem(section, f"not a component section; those are {names}")])
    spec = getattr(recipe, section)
    if spec is None:
        message = f"this recipe has no {section}; add a '{section}:' section"
        raise RecipeError([Problem(section, message)])
    return registry.instantiate(kind, spec, **extra)


def build_tokenizer(recipe: Recipe) -> Any:
    """Build the recipe's tokenizer and check that its ids fit the recipe's model.

    Args:
        recipe: A checked recipe with `tokenizer` and `model` sections.

    Returns:
        The tokenizer (an `m3.data.tokenizer.Tokenizer`).

    Raises:
        RecipeError: When the recipe has no tokenizer.
        UserError: When the tokenizer has more ids than `model.vocab_size`.
    """
    tokenizer = build(recipe, "tokenizer")
    vocab_size = recipe.model.config().vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"model.vocab_size is {vocab_size}, but the tokenizer has {tokenizer.vocab_size} "
            "ids: raise model.vocab_size, or use the tokenizer this model was trained with"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------
# Loading and merging


def _path(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _component_paths(schema: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    hints = get_type_hints(schema)
    paths = []
    for f in dataclasses.fields(schema):
        if "kind" in f.metadata:
            paths.append((*prefix, f.name))
        else:
            inner = [a for a in (hints[f.name], *get_args(hints[f.name])) if _is_section(a)]
            if inner:
                paths += _component_paths(inner[0], (*prefix, f.name))
    return paths


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and tp not in (ModelSpec, ComponentSpec)


def _get(data: Any, parts: Sequence[Any]) -> Any:
    for part in parts:
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if not (in_list or (isinstance(data, Mapping) and part in data)):
            raise KeyError(part)
        data = data[part]
    return data


def _normalise(layer: dict[str, Any], components: list[tuple[str, ...]]) -> dict[str, Any]:
    # `tokenizer: byte` is short for `tokenizer: {class_path: byte}`; spelling it out lets
    # a later layer's init_args merge into it.
    for parts in components:
        try:
            parent, value = _get(layer, parts[:-1]), _get(layer, parts)
        except KeyError:
            continue
        if isinstance(value, str) and "${" not in value and isinstance(parent, dict):
            parent[parts[-1]] = {"class_path": value}
    return layer


def _merge(
    base: dict[str, Any], layer: Mapping[str, Any], components: list[tuple[str, ...]]
) -> dict[str, Any]:
    # A layer that names another class for a component replaces it whole: the old class's
    # init_args would not fit the new one.
    for parts in components:
        try:
            old, new = _get(base, parts), _get(layer, parts)
        except KeyError:
            continue
        if (
            isinstance(old, Mapping)
            and isinstance(new, Mapping)
            and "class_path" in new
            and old.get("class_path") != new["class_path"]
        ):
            _get(base, parts[:-1])[parts[-1]] = {}
    return _deep_merge(base, layer)


def _deep_merge(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _YamlLoader(yaml.SafeLoader):
    """YAML as recipes read it: safe, `1e-3` a float, dates kept as text, no repeated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:  # PyYAML would silently keep the last one
                problem = f"found duplicate key {key!r}"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats without a dot or exponent sign (1e-3, 5e4), which PyYAML reads as text.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
_YamlLoader.add_constructor("tag:yaml.org,2002:timestamp", _YamlLoader.construct_yaml_str)


def _read_file(path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    name = str(path)
    if not path.exists():
        return None, [Problem(name, "no such recipe file")]
    if not path.is_file():
        return None, [Problem(name, "not a file")]
    try:
        # A SafeLoader: it builds plain values only, never Python objects.
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        return None, [Problem(name, f"cannot read this YAML file: {detail}")]
    if loaded is None:
        return {}, []
    if not isinstance(loaded, dict):
        kind = type(loaded).__name__
        return None, [Problem(name, f"a recipe must be a mapping of keys to values, not a {kind}")]
    return loaded, []


_OVERRIDE = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*)=(.*)", re.DOTALL)


def _read_override(item: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    match = _OVERRIDE.fullmatch(item)
    if match is None:
        message = f"override {item!r} is not of the form key=value (e.g. model.n_layer=6)"
        return None, [Problem("", message)]
    key, text = match.groups()
    try:
        value = yaml.load(text, Loader=_YamlLoader)
    except (ValueError, RecursionError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        return None, [Problem(key, f"cannot parse the value {text!r}: {detail}")]
    for part in reversed(key.split(".")):
        value = {part: value}
    return value, []


def _plain(node: Any, parts: tuple[Any, ...], problems: list[Problem], bad: list[str]) -> Any:
    # Only what OmegaConf and the schema understand passes; the rest is reported and dropped.
    path = _path(parts)
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if isinstance(key, str):
                out[key] = _plain(value, (*parts, key), problems, bad)
            else:
                where = _path((*parts, str(key)))
                problems.append(Problem(where, f"keys must be text, got {registry.show(key)}"))
                bad.append(where)
        return out
    if isinstance(node, list):
        return [_plain(value, (*parts, i), problems, bad) for i, value in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        try:
            OmegaConf.create({"value": node})
        except OmegaConfBaseException as err:
            problems.append(Problem(path, f"invalid interpolation: {str(err).splitlines()[0]}"))
            bad.append(path)
            return None
    if node is None or isinstance(node, (str, int, float, bool)):
        return node
    problems.append(Problem(path, f"unsupported value of type {type(node).__name__}"))
    bad.append(path)
    return None


def _preset_fields(preset: str) -> dict[str, Any]:
    fields = {f.name: f.default for f in dataclasses.fields(Config) if f.name != "name"}
    fields.update(PRESETS[preset])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _with_preset(merged: dict[str, Any]) -> dict[str, Any]:
    # Spell out the preset's fields so that `${model.vocab_size}` resolves; the fields equal
    # to the preset are dropped again when the model section is checked.
    model = merged.get("model")
    preset = model.get("preset") if isinstance(model, Mapping) else None
    if isinstance(preset, str) and preset in PRESETS:
        merged["model"] = {**_preset_fields(model["preset"]), **model}
    return merged


def _resolve(node: Any, parts: tuple[Any, ...], problems: list[Problem], bad: list[str]) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        out: Any = {} if isinstance(node, DictConfig) else []
        for key in keys:
            where = (*parts, key)
            try:
                child = node[key]
            except MissingMandatoryValue:
                message = "missing value (???): set it in a later file or on the command line"
                problems.append(Problem(_path(where), message))
                bad.append(_path(where))
                child = None
            except (OmegaConfBaseException, RecursionError) as err:
                detail = str(err).splitlines()[0] if str(err) else type(err).__name__
                problems.append(Problem(_path(where), f"cannot resolve interpolation: {detail}"))
                bad.append(_path(where))
                child = None
            value = _resolve(child, where, problems, bad)
            if isinstance(out, dict):
                out[key] = value
            else:
                out.append(value)
        return out
    return node


def _related(path: str, others: list[str]) -> bool:
    # Equal to, inside, or around one of the paths: used to avoid reporting twice.
    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or a.startswith(b + "[")

    return any(inside(path, other) or inside(other, path) for other in others)


def _origin(path: str, layers: list[tuple[str, dict[str, Any]]]) -> str | None:
    parts: list[Any] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(index) if index else name)
    for label, layer in reversed(layers):
        try:
            value = _get(layer, parts)
        except KeyError:
            continue
        # A section may hold keys from several layers: name the origin of values only.
        return None if isinstance(value, Mapping) else label
    return None


def _describe_sources(paths: Sequence[Path], overrides: Sequence[str]) -> str:
    names = [str(p) for p in paths]
    if overrides:
        names.append(f"{len(overrides)} override{'s' if len(overrides) != 1 else ''}")
    if len(names) <= 1:
        return names[0] if names else "the recipe"
    return ", ".join(names[:-1]) + " and " + names[-1]


def load_recipe(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge and check a recipe.

    Files are merged in order (mappings merge key by key; other values, lists included,
    replace). A file that names a different `class_path` for a component replaces that
    component whole. Then `overrides` (`key=value`, the value read as YAML) apply, then
    interpolations are resolved, then everything is checked. Nothing is built except
    components of kinds with `build_to_check`, and no file is written.

    Args:
        paths: One or more recipe files.
        overrides: `key=value` items, applied in order after all files.

    Returns:
        The checked recipe.

    Raises:
        RecipeError: Listing every problem found, each with its key path.
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    sources = _describe_sources(files, overrides)
    components = _component_paths(Recipe)
    problems: list[Problem] = []
    if not files:
        problems.append(Problem("", "name at least one recipe file"))
    layers: list[tuple[str, dict[str, Any]]] = []
    for path in files:
        layer, found = _read_file(path)
        problems += found
        if layer is not None:
            layers.append((str(path), _normalise(layer, components)))
    if problems:  # without every file, the rest cannot be checked meaningfully
        raise RecipeError(problems, sources=sources)
    # An override that cannot be read is reported and skipped; the rest is still checked,
    # but not what the skipped override would have set.
    unresolved: list[str] = []
    command_line: dict[str, Any] = {}
    for item in overrides:
        layer, found = _read_override(item)
        problems += found
        unresolved += [p.path for p in found if p.path]
        if layer is not None:
            command_line = _deep_merge(command_line, _normalise(layer, components))
    if overrides:
        layers.append((_COMMAND_LINE, command_line))

    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged = _merge(merged, copy.deepcopy(layer), components)
    config = OmegaConf.create(_with_preset(_plain(merged, (), problems, unresolved)))
    data = _resolve(config, (), problems, unresolved)
    recipe, found = validate(data)
    problems += [p for p in found if not _related(p.path, unresolved)]
    if problems:
        if len(layers) > 1:
            problems = [_with_origin(p, layers) for p in problems]
        raise RecipeError(problems, sources=sources)
    assert recipe is not None  # no problems means a recipe was built
    return recipe


def _with_origin(problem: Problem, layers: list[tuple[str, dict[str, Any]]]) -> Problem:
    origin = _origin(problem.path, layers)
    if origin is None:
        return problem
    return Problem(problem.path, f"{problem.message} (from {origin})")


# ---------------------------------------------------------------------------------------
# Checking against the schema


def validate(data: Any, schema: type[T] = Recipe) -> tuple[T | None, list[Problem]]:
    """Check plain data (interpolations already resolved) against a recipe schema.

    Args:
        data: A mapping, as YAML gives it.
        schema: The dataclass to check against; `Recipe` unless you check a section.

    Returns:
        The dataclass instance (None when there were problems) and every problem found.
    """
    problems: list[Problem] = []
    result = _check_section(data, schema, "", problems)
    if isinstance(result, Recipe) and not problems:
        problems += _check_bank(result)
    if isinstance(result, Recipe) and not problems and result.stages is not None:
        problems += _checked_stages(result)[1]
    return (result if not problems else None), problems


def stage_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The recipe of each stage of a pipeline recipe.

    A stage's recipe is the pipeline recipe without `stages`, with the stage's keys merged
    over it (mappings key by key, other values replaced) and `output` defaulting to
    `<output>/<name>`.

    Args:
        recipe: A checked recipe with `stage: pipeline`.

    Returns:
        `(name, recipe)` of every stage, in order.

    Raises:
        RecipeError: Listing the problems of every stage, each under `stages.<name>`.
    """
    stages, problems = _checked_stages(recipe)
    if problems:
        raise RecipeError(problems, sources="the pipeline recipe")
    return stages


def _stage_recipe(recipe: Recipe, name: str) -> tuple[Recipe | None, list[Problem]]:
    base = {k: v for k, v in recipe.to_dict().items() if k not in ("stages", "description")}
    base["output"] = f"{recipe.output}/{name}"
    base.pop("stage", None)
    merged = _deep_merge(base, (recipe.stages or {})[name])
    merged.setdefault("description", f"stage {name} of: {recipe.description}")
    return validate(merged)


def _checked_stages(recipe: Recipe) -> tuple[list[tuple[str, Recipe]], list[Problem]]:
    """Every stage's recipe, checked once, and the problems of all of them."""
    if recipe.stage != "pipeline":
        message = f"a recipe with stages has stage: pipeline, got {recipe.stage!r}"
        return [], [Problem("stage", message)]
    if not recipe.stages:
        return [], [Problem("stages", "a pipeline needs at least one stage")]
    stages: list[tuple[str, Recipe]] = []
    problems: list[Problem] = []
    for name, keys in recipe.stages.items():
        where = f"stages.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            message = "a stage name is letters, digits, '_', '-' or '.'"
            problems.append(Problem(where, message))
        stage = keys.get("stage")
        if stage is None or stage == "pipeline":
            message = f"each stage sets its stage (not pipeline), got {stage!r}"
            problems.append(Problem(f"{where}.stage", message))
            continue
        checked, found = _stage_recipe(recipe, name)
        problems += [Problem(f"{where}: {p.path}", p.message) for p in found]
        if checked is not None:
            stages.append((name, checked))
    return stages, problems


def _unknown_key(path: str, key: Any, allowed: Sequence[str]) -> Problem:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    message = f"unknown key; {hint}allowed: {', '.join(allowed)}"
    return Problem(_path([path, key] if path else [key]), message)


def _check_section(value: Any, schema: type, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {registry.show(value)}"))
        return None
    before = len(problems)
    hints = get_type_hints(schema, include_extras=True)
    fields = [f for f in dataclasses.fields(schema) if f.init]
    names = [f.name for f in fields]
    for key in value:
        if key not in names:
            problems.append(_unknown_key(path, key, names))
    kwargs = {}
    for f in fields:
        where = f"{path}.{f.name}" if path else f.name
        if f.name in value:
            kwargs[f.name] = _check_field(value[f.name], hints[f.name], f, where, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(Problem(where, "missing required key"))
    if len(problems) > before:
        return None
    return schema(**kwargs)


def _check_field(
    value: Any, annotation: Any, f: dataclasses.Field[Any], path: str, problems: list[Problem]
) -> Any:
    union = get_origin(annotation) in (Union, types.UnionType)
    members = [a for a in get_args(annotation) if a is not type(None)] if union else [annotation]
    if value is None and union and type(None) in get_args(annotation):
        return None
    inner = members[0] if len(members) == 1 else annotation
    if get_origin(inner) is list and get_args(inner) == (ComponentSpec,):
        if not isinstance(value, list) or not value:
            problems.append(
                Problem(
                    path, f"expected a non-empty list of components, got {registry.show(value)}"
                )
            )
            return None
        specs = []
        for i, item in enumerate(value):
            spec, found = registry.check_spec(f.metadata["kind"], item, path=f"{path}[{i}]")
            if spec is not None and not found:
                found = registry.check_by_building(f.metadata["kind"], spec, path=f"{path}[{i}]")
            problems += found
            specs.append(spec)
        return specs
    if inner is ComponentSpec:
        kind, provided = f.metadata["kind"], f.metadata.get("provided", ())
        spec, found = registry.check_spec(kind, value, path=path, provided=provided)
        if spec is not None:
            found += [
                Problem(
                    f"{path}.init_args.{name}", "is set by m3 itself; remove it from the recipe"
                )
                for name in provided
                if name in spec.init_args
            ]
        if spec is not None and not found and not provided:
            # (a part whose arguments m3 completes is built, and checked, when it is used)
            found = registry.check_by_building(kind, spec, path=path)
        problems += found
        return spec
    if inner is ModelSpec:
        return _check_model(value, path, problems)
    if _is_section(inner):
        return _check_section(value, inner, path, problems)
    problems += registry.check_value(value, annotation, path)
    return value


def _check_model(value: Any, path: str, problems: list[Problem]) -> ModelSpec | None:
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected a mapping, got {registry.show(value)}"))
        return None
    before = len(problems)
    presets = ", ".join(PRESETS)
    preset = value.get("preset")
    if "preset" not in value:
        message = f"missing required key; choose one of {presets}"
        problems.append(Problem(f"{path}.preset", message))
    elif not isinstance(preset, str) or preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown model preset {registry.show(preset)}{hint} Choose one of {presets}"
        problems.append(Problem(f"{path}.preset", message))
    hints = get_type_hints(Config)
    allowed = ["preset", *(name for name in hints if name != "name")]
    fitting = {}
    for key, item in value.items():
        if key == "preset":
            continue
        if key not in allowed:
            problems.append(_unknown_key(path, key, allowed))
            continue
        found = registry.check_value(item, hints[key], f"{path}.{key}")
        problems += found
        if not found:
            fitting[key] = item
    if not isinstance(preset, str) or preset not in PRESETS:
        return None
    # Config checks ranges and consistency itself; ask it even when other keys are wrong.
    baseline = _preset_fields(preset)
    overrides = {k: v for k, v in fitting.items() if baseline.get(k) != v}
    try:
        Config.from_name(preset, **overrides)
    except UserError as err:
        problems += _config_problems(str(err), path, allowed)
    if len(problems) > before:
        return None
    return ModelSpec(preset, overrides)


def _config_problems(message: str, path: str, fields: Sequence[str]) -> list[Problem]:
    # Config reports "invalid model config 'x': a must ...; b must ..."; give each its key.
    detail = message.split(": ", 1)[-1]
    problems = []
    for part in detail.split("; "):
        key = part.split(" ", 1)[0]
        if key in fields and part.startswith(f"{key} must"):
            problems.append(Problem(f"{path}.{key}", part[len(key) + 1 :]))
        else:
            problems.append(Problem(path, part))
    return problems


def _escape(value: Any) -> Any:
    # A resolved string that holds "${" must stay text when the YAML is loaded again.
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def _to_plain(value: Any) -> Any:
    if isinstance(value, ModelSpec):
        return {"preset": value.preset, **_to_plain(dict(value.overrides))}
    if isinstance(value, ComponentSpec):
        return _to_plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# Shipped recipes


class ShippedRecipe(NamedTuple):
    """A recipe file shipped in `recipes/`.

    Attributes:
        path: The file.
        description: Its one-line `description`.
        command: The command that runs it, from its first line (`# m3 ...`).
    """

    path: Path
    description: str
    command: str


def shipped_recipes(directory: str | Path | None = None) -> list[ShippedRecipe]:
    """List the shipped recipes with their descriptions and commands.

    Every recipe opens with a comment line `# m3 <verb> ...`: the exact command that runs
    it, from the repository's root directory.

    Args:
        directory: Where to look; `RECIPES_DIR` when None.

    Returns:
        The recipes, sorted by path; empty when the directory does not exist (as in an
        installed wheel, which does not carry them).

    Raises:
        RecipeError: When a recipe file cannot be read or lacks its command line.
    """
    root = Path(directory) if directory is not None else RECIPES_DIR
    found, problems = [], []
    for path in sorted(root.rglob("*.yaml")) if root.is_dir() else []:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        command = first[1:].strip() if first.startswith("#") else ""
        if not command.startswith("m3 "):
            problems.append(Problem(str(path), "must open with a comment line '# m3 ...'"))
        layer, trouble = _read_file(path)
        problems += trouble
        description = layer.get("description", "") if layer else ""
        found.append(ShippedRecipe(path, str(description), command))
    if problems:
        raise RecipeError(problems, sources=str(root))
    return found
