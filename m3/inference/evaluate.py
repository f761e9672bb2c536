"""Evaluation: held-out loss and multiple-choice cloze, with memory, without memory and with RAG.

The same model is scored in several *modes*, so that the table isolates what explicit memory
adds:

- `memory`: every chunk reads the memories its retriever returns (the paper's setting);
- `none`: memory mode with nothing to read (the reference prefix still acts as attention sink,
  positions as with memory), the model's own no-memory baseline;
- `rag`: no memories, but the texts of `k` references retrieved once with the query are
  prepended to the context (the retrieval-augmented-generation baseline on the same model and
  retriever);
- `shuffled` (cloze only): each question reads the memories retrieved for *another* question,
  a negative control that should fall back to the `none` level.

Held-out text is scored under two retrieval protocols:

- `paper`: each 64-token chunk retrieves with its own text, and references overlapping the
  sequence by more than the threshold (Eq. 6, 2/3 at evaluation) are dropped;
- `causal`: chunk `c` reads the memories retrieved with chunk `c − 1`'s text (chunk 0 reads
  none), as during generation, where a chunk's memories must be known before it is written.

A cloze question retrieves with its prompt (the text before the answer), so the two
protocols coincide there. Accuracy comes with a 95% Wilson score interval.

```python
results = evaluate_cloze(model, tokenizer, questions, retriever=retriever)
results["memory"].accuracy, results["memory"].interval
heldout = evaluate_heldout(model, tokenizer, texts, retriever=retriever)
heldout["paper"]["memory"].loss
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torchmetrics.aggregation import MeanMetric, SumMetric
from tqdm.auto import tqdm

from m3.core.errors import UserError
from m3.data.tokenizer import Tokenizer
from m3.inference.rag import rag_prefixes
from m3.inference.scoring import (
    heldout_memories,
    reference_prefix_ids,
    scored_continuations,
    scored_tokens,
)

if TYPE_CHECKING:
    from pathlib import Path

    from m3.data.world import ClozeQuestion
    from m3.model.memory3 import Memory3
    from m3.recipes import Recipe
    from m3.retrieval.retriever import Retriever

ClozeMode = Literal["memory", "none", "rag", "shuffled"]
TextMode = Literal["memory", "none", "rag"]
Protocol = Literal["paper", "causal"]

#: How the `none` mode reads a model: "empty" — memory mode with no memories, the same
#: model reading nothing (right for a model trained with memory); "warmup" — warmup mode, no
#: reference prefix and positions from the context's `<s>` (right for a model trained
#: without memory, e.g. a warmup stage or a no-memory baseline).
WithoutMemory = Literal["empty", "warmup"]
WITHOUT_MEMORY: tuple[WithoutMemory, ...] = ("empty", "warmup")
CLOZE_MODES: tuple[ClozeMode, ...] = ("memory", "none", "rag", "shuffled")
TEXT_MODES: tuple[TextMode, ...] = ("memory", "none", "rag")
PROTOCOLS: tuple[Protocol, ...] = ("paper", "causal")


def wilson_interval(correct: int, total: int, *, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion.

    Args:
        correct: Successes.
        total: Trials (> 0).
        z: Standard-normal quantile (1.96: 95%).

    Returns:
        `(low, high)`, within [0, 1].
    """
    if total <= 0:
        raise ValueError("an interval needs at least one trial")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # at p = 0 or 1 an end is exactly 0 or 1; the formula would round just inside
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class ClozeScore:
    """Multiple-choice cloze accuracy of one mode.

    Attributes:
        accuracy: Share of questions whose correct option scored highest.
        low: Lower end of the 95% Wilson interval.
        high: Upper end of the 95% Wilson interval.
        questions: Questions asked.
        chance: Accuracy of a uniform guess.
    """

    accuracy: float
    low: float
    high: float
    questions: int
    chance: float

    @property
    def interval(self) -> tuple[float, float]:
        """`(low, high)`."""
        return self.low, self.high


@dataclass(frozen=True)
class TextScore:
    """Next-token metrics on held-out text in one mode.

    Attributes:
        loss: Mean cross-entropy per predicted token (nats).
        perplexity: `exp(loss)`.
        accuracy: Share of tokens predicted right (argmax).
        tokens: Tokens scored.
    """

    loss: float
    perplexity: float
    accuracy: float
    tokens: int


# --------------------------------------------------------------------------------- cloze


def evaluate_cloze(
    model: Memory3,
    tokenizer: Tokenizer,
    questions: Sequence[ClozeQuestion],
    *,
    retriever: Retriever | None = None,
    modes: Sequence[ClozeMode] = CLOZE_MODES,
    batch_size: int = 32,
    seed: int = 0,
    without_memory: WithoutMemory = "empty",
    progress: bool = False,
) -> dict[str, ClozeScore]:
    """Multiple-choice cloze accuracy: the option with the highest log-likelihood wins.

    Each question is read as `<s>` + prompt + option; the option's tokens are scored.

    Args:
        model: A model with memory layers (evaluated in memory mode).
        tokenizer: The model's tokenizer.
        questions: The questions (`m3.data.world.ClozeQuestion` fields: prompt, options, answer).
        retriever: Retrieves `k` memories per question with its prompt; needed for every
            mode but `none`.
        modes: Which of `memory`, `none`, `rag`, `shuffled` to score.
        batch_size: Questions per forward pass (times their options).
        seed: Seed of the shuffled control's permutation.
        without_memory: How the `none` mode reads the model (see `WITHOUT_MEMORY`).
        progress: Show a progress bar per mode.

    Returns:
        Mode -> score.

    Raises:
        UserError: For no questions, an unknown mode, or a mode that needs a retriever
            without one.
    """
    if not questions:
        raise UserError("no cloze questions to evaluate")
    unknown = sorted(set(modes) - set(CLOZE_MODES))
    if unknown:
        raise UserError(f"unknown cloze mode(s) {unknown}; expected some of {list(CLOZE_MODES)}")
    if retriever is None and any(m != "none" for m in modes):
        raise UserError("cloze modes other than 'none' need a retriever")
    model.eval()
    device = next(model.parameters()).device
    prefix = reference_prefix_ids(tokenizer, device)
    contexts = [[tokenizer.bos_id, *tokenizer.encode(q.prompt)] for q in questions]
    option_ids = [[tokenizer.encode(o) for o in q.options] for q in questions]
    retrieved = None
    if retriever is not None and {"memory", "shuffled"} & set(modes):
        retrieved = retriever.retrieve(
            [[q.prompt] for q in questions], leak_texts=[c[1:] for c in contexts]
        ).memories
    shuffled = torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed))
    results: dict[str, ClozeScore] = {}
    for mode in modes:
        rows = contexts
        if mode == "rag":
            before = rag_prefixes(retriever, tokenizer, [q.prompt for q in questions])  # type: ignore[arg-type]
            rows = [[c[0], *b, *c[1:]] for c, b in zip(contexts, before, strict=True)]
        correct = SumMetric()
        # questions of similar lengths together: less padding; each is scored on its own
        by_length = sorted(range(len(questions)), key=lambda q: len(rows[q]))
        starts = range(0, len(questions), batch_size)
        for start in tqdm(starts, desc=f"cloze, {mode}", disable=not progress, leave=False):
            batch = by_length[start : start + batch_size]
            memories = None
            if mode in ("memory", "shuffled"):
                source = torch.tensor(batch)
                source = source if mode == "memory" else shuffled[source]
                memories = retrieved.take_rows(source)  # type: ignore[union-attr]
            reading = None if mode == "none" and without_memory == "warmup" else prefix
            scores = scored_continuations(
                model, [rows[q] for q in batch], [option_ids[q] for q in batch], memories, reading
            )
            for q, option_scores in zip(batch, scores, strict=True):
                correct.update(float(int(option_scores.argmax()) == questions[q].answer))
        hits = round(float(correct.compute()))
        low, high = wilson_interval(hits, len(questions))
        results[mode] = ClozeScore(
            hits / len(questions), low, high, len(questions), questions[0].chance
        )
    return results


# --------------------------------------------------------------------------- held-out text


def heldout_sequences(
    tokenizer: Tokenizer, texts: Sequence[str], *, seq_length: int, max_sequences: int | None
) -> list[list[int]]:
    """Cut held-out documents into scoring windows: `<s>` + up to `seq_length` tokens each.

    Args:
        tokenizer: Encodes the texts.
        texts: Held-out documents.
        seq_length: Tokens per window after the `<s>`.
        max_sequences: Most windows kept (the first ones); None keeps all.

    Returns:
        Token-id windows (each at least two tokens long).

    Raises:
        UserError: When no text has a token to predict.
    """
    windows = []
    for text in texts:
        ids = tokenizer.encode(text)
        for start in range(0, len(ids), seq_length):
            windows.append([tokenizer.bos_id, *ids[start : start + seq_length]])
    windows = [w for w in windows if len(w) > 1][:max_sequences]
    if not windows:
        raise UserError("the held-out text is empty: nothing to score")
    return windows


def evaluate_heldout(
    model: Memory3,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    retriever: Retriever | None = None,
    modes: Sequence[TextMode] = TEXT_MODES,
    protocols: Sequence[Protocol] = PROTOCOLS,
    seq_length: int = 256,
    batch_size: int = 8,
    max_sequences: int | None = 64,
    without_memory: WithoutMemory = "empty",
    progress: bool = False,
) -> dict[str, dict[str, TextScore]]:
    """Loss, perplexity and next-token accuracy on held-out text.

    Args:
        model: A model with memory layers (evaluated in memory mode).
        tokenizer: The model's tokenizer.
        texts: Held-out documents (cut by `heldout_sequences`).
        retriever: Needed for the `memory` and `rag` modes.
        modes: Which of `memory`, `none`, `rag` to score.
        protocols: Retrieval protocols of the `memory` mode: `paper`, `causal`. The `none`
            and `rag` modes do not depend on them and are reported under each.
        seq_length: Tokens per scored window after its `<s>`.
        batch_size: Windows per forward pass.
        max_sequences: Most windows scored.
        without_memory: How the `none` mode reads the model (see `WITHOUT_MEMORY`).
        progress: Show a progress bar per protocol and mode.

    Returns:
        Protocol -> mode -> score.

    Raises:
        UserError: For empty text, an unknown mode or protocol, or a missing retriever.
    """
    if set(modes) - set(TEXT_MODES) or set(protocols) - set(PROTOCOLS):
        raise UserError(
            f"modes must be among {list(TEXT_MODES)} and protocols among {list(PROTOCOLS)}; "
            f"got {list(modes)} and {list(protocols)}"
        )
    if retriever is None and any(m != "none" for m in modes):
        raise UserError("held-out modes other than 'none' need a retriever")
    model.eval()
    device = next(model.parameters()).device
    prefix = reference_prefix_ids(tokenizer, device)
    windows = heldout_sequences(
        tokenizer, texts, seq_length=seq_length, max_sequences=max_sequences
    )
    chunk = model.config.chunk_length
    shared: dict[str, TextScore] = {}
    results: dict[str, dict[str, TextScore]] = {}
    for protocol in protocols:
        results[protocol] = {}
        for mode in modes:
            if mode != "memory" and mode in shared:
                results[protocol][mode] = shared[mode]
                continue
            metrics = (MeanMetric(), MeanMetric())
            starts = range(0, len(windows), batch_size)
            label = f"held-out, {mode}" + (f" ({protocol})" if mode == "memory" else "")
            for start in tqdm(starts, desc=label, disable=not progress, leave=False):
                batch = windows[start : start + batch_size]
                rows, scored_from, memories = batch, [1] * len(batch), None
                if mode == "memory":
                    memories = heldout_memories(
                        retriever,  # type: ignore[arg-type]
                        batch,
                        chunk_length=chunk,
                        protocol=protocol,
                    )
                elif mode == "rag":
                    queries = [tokenizer.decode(w[1:]) for w in batch]
                    before = rag_prefixes(retriever, tokenizer, queries)  # type: ignore[arg-type]
                    rows = [[w[0], *b, *w[1:]] for w, b in zip(batch, before, strict=True)]
                    scored_from = [1 + len(b) for b in before]
                reading = None if mode == "none" and without_memory == "warmup" else prefix
                token_logp, hits, mask = scored_tokens(model, rows, scored_from, memories, reading)
                metrics[0].update(-token_logp[mask].cpu())
                metrics[1].update(hits[mask].cpu())
            loss = float(metrics[0].compute())
            tokens = sum(len(w) - 1 for w in windows)
            score = TextScore(loss, math.exp(loss), float(metrics[1].compute()), tokens)
            results[protocol][mode] = score
            if mode != "memory":
                shared[mode] = score
    return results


def as_plain(results: dict) -> dict:
    """Scores as plain JSON-ready dictionaries (dataclasses turned into dicts).

    Args:
        results: Nested dictionaries of `ClozeScore` / `TextScore`.

    Returns:
        The same nesting with plain values.
    """
    return {
        key: as_plain(value) if isinstance(value, dict) else asdict(value)
        for key, value in results.items()
    }


# ------------------------------------------------------------------------------ the stage


def markdown_table(cloze: dict[str, ClozeScore], heldout: dict[str, dict[str, TextScore]]) -> str:
    """The results as Markdown: one cloze table, one held-out table.

    Args:
        cloze: Mode -> cloze score.
        heldout: Protocol -> mode -> held-out score.

    Returns:
        Markdown text.
    """
    lines = []
    if cloze:
        first = next(iter(cloze.values()))
        lines += [
            f"Multiple-choice cloze, {first.questions} questions (chance {first.chance:.0%}), "
            "95% Wilson intervals:",
            "",
            "| mode | accuracy | 95% interval |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {mode} | {s.accuracy:.1%} | {s.low:.1%} – {s.high:.1%} |"
            for mode, s in cloze.items()
        ]
        lines.append("")
    if heldout:
        lines += [
            "Held-out text (loss in nats per token):",
            "",
            "| protocol | mode | loss | perplexity | token accuracy | tokens |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for protocol, scores in heldout.items():
            lines += [
                f"| {protocol} | {mode} | {s.loss:.4f} | {s.perplexity:.2f} | "
                f"{s.accuracy:.1%} | {s.tokens} |"
                for mode, s in scores.items()
            ]
        lines.append("")
    return "\n".join(lines)


def plot_results(
    folder: Path, cloze: dict[str, ClozeScore], heldout: dict[str, dict[str, TextScore]]
) -> list[Path]:
    """Bar charts of the cloze accuracies (with intervals and chance) and held-out losses.

    Args:
        folder: Where the PNGs go (`cloze.png`, `heldout.png`).
        cloze: Mode -> cloze score.
        heldout: Protocol -> mode -> held-out score.

    Returns:
        The PNGs written.
    """
    from m3.core.plots import plot_bars

    written = []
    if cloze:
        scores = list(cloze.values())
        written.append(
            plot_bars(
                folder / "cloze.png",
                list(cloze),
                [s.accuracy for s in scores],
                errors=[s.interval for s in scores],
                reference=scores[0].chance,
                reference_label="chance",
                ylabel="accuracy",
                title=f"Cloze accuracy, {scores[0].questions} questions",
            )
        )
    if heldout:
        labels, losses = [], []
        for protocol, by_mode in heldout.items():
            for mode, score in by_mode.items():
                if mode == "memory" or protocol == next(iter(heldout)):
                    labels.append(f"{mode} ({protocol})" if mode == "memory" else mode)
                    losses.append(score.loss)
        written.append(
            plot_bars(
                folder / "heldout.png",
                labels,
                losses,
                ylabel="loss (nats/token)",
                title="Held-out loss",
            )
        )
    return written


def evaluate_recipe(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """Run the evaluation a recipe describes (`stage: evaluate`; `m3 evaluate`).

    Writes `evaluation.json`, `evaluation.md`, `cloze.png` and `heldout.png` into the
    recipe's output folder; with `evaluation.generation`, also the generation metric
    (`m3.inference.generation_score`) and `generation.png`.

    Args:
        recipe: A checked recipe with an `evaluation:` section and what `load_inference`
            needs (weights, tokenizer, `retrieval.bank`).
        overwrite: Replace a folder that another recipe wrote.

    Returns:
        The output folder.

    Raises:
        UserError: For a recipe without questions or held-out text, missing files, or a
            bank that does not belong to the model.
    """
    import json

    from m3.core import registry
    from m3.core.runs import RunFolder
    from m3.data.world import read_cloze
    from m3.inference.loading import load_inference

    spec = recipe.evaluation
    if spec is None or (spec.cloze is None and not spec.heldout):
        raise UserError("evaluation: name cloze questions (evaluation.cloze) or held-out text")
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if run.complete and not overwrite:
        print(f"m3 evaluate: {run.path} is complete for this recipe; nothing to do")
        return run.path
    questions = read_cloze(spec.cloze)[: spec.n_questions] if spec.cloze else []
    generation_spec = spec.generation
    if generation_spec is not None:
        from m3.inference import generation_score as gen

        if not questions:
            raise UserError("evaluation.generation needs cloze questions (evaluation.cloze)")
        gen.check_modes(generation_spec.modes)
    texts = [
        d.text for s in spec.heldout or [] for d in registry.instantiate("source", s).documents()
    ]
    with load_inference(recipe) as inference:
        run.claim(overwrite=overwrite)  # the model and the bank load: now the folder is ours
        model, tokenizer, retriever = inference.model, inference.tokenizer, inference.retriever
        cloze = (
            evaluate_cloze(
                model,
                tokenizer,
                questions,
                retriever=retriever,
                batch_size=spec.batch_size,
                seed=recipe.seed,
                without_memory=spec.without_memory,
                progress=True,
            )
            if questions
            else {}
        )
        heldout = (
            evaluate_heldout(
                model,
                tokenizer,
                texts,
                retriever=retriever,
                protocols=spec.protocols,
                seq_length=spec.seq_length,
                batch_size=spec.batch_size,
                max_sequences=spec.max_sequences,
                without_memory=spec.without_memory,
                progress=True,
            )
            if texts
            else {}
        )
        results = {"cloze": as_plain(cloze), "heldout": as_plain(heldout)}
        table = markdown_table(cloze, heldout)
        if generation_spec is not None:
            generation = gen.evaluate_recipe_generation(inference, questions, spec, progress=True)
            results.update(generation)
            table += "\n" + gen.generation_markdown(generation)
            gen.plot_generation(run.path, generation["generation"])
    (run.path / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    (run.path / "evaluation.md").write_text(table)
    plot_results(run.path, cloze, heldout)
    print(table)
    run.finish({"evaluation": results})
    return run.path
