"""The shape of a recipe: `Recipe`, its plain sections, and where it names components.

A `Recipe` is a frozen dataclass whose fields are its top-level keys. A group of plain
values is a nested dataclass here (`world:`, `evaluation:`, `lm_eval:`, `retrieval:`,
`bank:`, `generation:`); a section that is a component's constructor arguments (`training:`,
`data:`, `trainer:`) is a `m3.recipes.sections.Section`; an interchangeable part is a
`ComponentSpec | None` field with `metadata={"kind": "<kind>"}`. Adding a section is local:
add a field to `Recipe`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml

from m3.core.registry import ComponentSpec
from m3.core.values import Bounds, InputPath
from m3.model.config import PRESETS, Config
from m3.recipes.sections import DataSection, Section, TrainerSection, TrainingSection

#: What a recipe is for: `m3 fit` runs warmup and continual, `m3 build-memory` build_memory,
#: `m3 evaluate` evaluate, `m3 generate` generate; `world` (write the synthetic world and its
#: tokenizer), `edit` (measure knowledge edits) and `lm_eval` (score lm-evaluation-harness
#: tasks) run as stages of a `pipeline` (`m3 run`).
Stage = Literal[
    "world",
    "warmup",
    "continual",
    "build_memory",
    "evaluate",
    "generate",
    "edit",
    "lm_eval",
    "pipeline",
]


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
class GenerationMetricSection:
    """The generation metric of `m3 evaluate` (`m3.inference.generation_score`).

    Greedy generation after each cloze prompt, scored by whether the continuation states
    the correct answer (its words first: exact; anywhere: contains).

    Attributes:
        n_questions: Questions asked (the first cloze questions that the evaluation reads);
            null: all of them.
        max_new_tokens: Tokens generated per question; the contains-match looks at all of
            them, so a larger value is looser.
        batch_size: Questions decoded together.
        modes: Which of "memory", "none", "rag" to score.
    """

    n_questions: Annotated[int, Bounds(ge=1)] | None = 200
    max_new_tokens: Annotated[int, Bounds(ge=1)] = 16
    batch_size: Annotated[int, Bounds(ge=1)] = 64
    modes: list[Literal["memory", "none", "rag"]] = field(
        default_factory=lambda: ["memory", "none", "rag"]
    )


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
        generation: Also score greedy generation after the cloze prompts (`{}` for the
            defaults of `GenerationMetricSection`); null: not scored.
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
    generation: GenerationMetricSection | None = None


@dataclass(frozen=True, kw_only=True)
class LmEvalSection:
    """What an `lm_eval` stage scores with lm-evaluation-harness (`m3.inference.harness_runs`).

    Attributes:
        tasks: lm-eval task names (e.g. `arc_challenge`, whose dataset lm-eval downloads
            from the Hugging Face Hub), task YAML files, or `m3_cloze`: the questions of
            `evaluation.cloze` as a local task, whose `acc` is `m3 evaluate`'s accuracy.
        modes: How the model reads: "memory", "none" (memory mode, nothing to read), "rag"
            (references as text) and "warmup" (a plain causal LM); one column each.
        limit: Documents scored per task (the first ones); null: all.
        num_fewshot: Few-shot examples per document; null: each task's own.
        batch_size: Rows per forward pass.
        protocol: Retrieval of rolling log-likelihood windows: "paper" (each chunk with its
            own text) or "causal" (with the text before it).
        include_path: A folder of task YAMLs that lm-eval searches too.
        bootstrap_iters: lm-eval's bootstrap resamples for the standard errors of metrics
            that are not means (0: none).
    """

    tasks: list[str] = field(default_factory=lambda: ["m3_cloze"])
    modes: list[Literal["memory", "none", "rag", "warmup"]] = field(
        default_factory=lambda: ["memory", "none", "rag"]
    )
    limit: Annotated[int, Bounds(ge=1)] | None = None
    num_fewshot: Annotated[int, Bounds(ge=0)] | None = None
    batch_size: Annotated[int, Bounds(ge=1)] = 16
    protocol: Literal["paper", "causal"] = "paper"
    include_path: str | None = None
    bootstrap_iters: Annotated[int, Bounds(ge=0)] = 1000


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
        min_score: Drop candidates whose similarity to the chunk is at most this (0.0: read
            no reference that shares nothing with the text); null keeps the `k` best
            whatever they score. A chunk whose embedding is all zero reads nothing either way.
    """

    bank: str | None = None
    k: Annotated[int, Bounds(ge=1)] = 5
    threshold: Annotated[float, Bounds(ge=0, le=1)] | None = 2 / 3
    overfetch: Annotated[int, Bounds(ge=1)] = 3
    cache_size: Annotated[int, Bounds(ge=0)] = 4096
    min_score: float | None = None


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
    quantizer_file: InputPath | None = None
    train_references: Annotated[int, Bounds(ge=1)] = 1024


@dataclass(frozen=True, kw_only=True)
class GenerationSection:
    """Decoding settings of `m3 generate` (`m3.inference.generate.generate`).

    Attributes:
        max_new_tokens: Most tokens generated per prompt.
        mode: "memory" (explicit memories, swapped every chunk), "none" (the same model
            without memories), "rag" (the `retrieval.k` references as text before the
            prompt, no memories) or "warmup" (a plain causal LM: no reference prefix, no
            memories, as lm-eval's `m3` model with `mode=warmup`).
        temperature: Softmax temperature; 0 decodes greedily.
        top_k: Sample among the `top_k` most likely tokens only; null: all.
        top_p: Sample among the most likely tokens whose probabilities sum to `top_p`
            (nucleus sampling); null: all.
    """

    max_new_tokens: Annotated[int, Bounds(ge=1)] = 128
    mode: Literal["memory", "none", "rag", "warmup"] = "memory"
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
        chunker: How documents are cut into references (kind `chunker`); None: m3's default
            (`m3.recipes.defaults`: `fixed` at the model's `reference_length`).
        output: The run folder this recipe's stage writes to.
        data: The text and how it becomes sequences, or None: the arguments of
            `m3.training.datamodule.TextDataModule`.
        training: Optimisation settings of a training stage: the arguments of
            `m3.training.module.Memory3Module`.
        trainer: Lightning `Trainer` options (the `Trainer`'s arguments).
        encoder: Encodes references into memories (kind `encoder`); None: m3's default.
        sparsifier: Keeps the top tokens of each memory (kind `sparsifier`); None: m3's
            default (`top_k` at the model's `memory_tokens`).
        embedder: Embeds chunks and references for retrieval (kind `embedder`); None: m3's
            default (`hashed_ngram`).
        retrieval: Which memory bank inference reads, and how (`m3 generate`).
        generation: Decoding settings of `m3 generate`.
        bank: How `m3 build-memory` writes the bank: dtype, batch size, index, quantizer.
        world: The synthetic world a `world` stage writes.
        evaluation: What `m3 evaluate` scores.
        lm_eval: What an `lm_eval` stage scores with lm-evaluation-harness.
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
    lm_eval: LmEvalSection | None = None
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


def component_paths(schema: type = Recipe) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Where a recipe names components.

    Args:
        schema: A recipe schema: `Recipe`, or one of its sections.

    Returns:
        Key path (e.g. `("bank", "index")`, `("data", "train")`) -> the component's kind and
        whether the key holds a list of them, in field order.
    """
    hints = get_type_hints(schema)
    found: dict[tuple[str, ...], tuple[str, bool]] = {}
    for f in dataclasses.fields(schema):
        if "kind" in f.metadata:
            hint = hints[f.name]
            many = any(get_origin(a) is list for a in (hint, *get_args(hint)))
            found[(f.name,)] = (f.metadata["kind"], many)
            continue
        for inner in (hints[f.name], *get_args(hints[f.name])):
            if isinstance(inner, type) and issubclass(inner, Section):
                found.update({(f.name, k): v for k, v in inner.components().items()})
            elif dataclasses.is_dataclass(inner) and inner not in (ModelSpec, ComponentSpec):
                found.update({(f.name, *p): v for p, v in component_paths(inner).items()})
            else:
                continue
            break
    return found


def preset_fields(preset: str) -> dict[str, Any]:
    """Every field of a model preset, as plain values (what `${model.<field>}` sees).

    Args:
        preset: A key of `m3.model.config.PRESETS`.

    Returns:
        Field -> value (tuples as lists), without `name`.
    """
    fields = {f.name: f.default for f in dataclasses.fields(Config) if f.name != "name"}
    fields.update(PRESETS[preset])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
