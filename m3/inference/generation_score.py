"""Facts in generated text: greedy generation after the cloze prompts, scored against the answer.

The cloze score (`m3.inference.evaluate.evaluate_cloze`) asks which of a few options the
model finds likeliest; a user reads what the model *writes*. This metric decodes greedily
after each cloze prompt (the text that ends right before the answer) and checks whether the
continuation states the correct option, in the three modes of the evaluation:

- `memory`: as `m3.inference.generate.generate` reads memories: the prompt's chunk reads the
  memories its text retrieved (leakage filter as configured), and every 64 tokens the last
  chunk's text retrieves the next chunk's memories (paper §3.1);
- `none`: the same model reading no memories (warmup mode with
  `evaluation.without_memory: warmup`, as the cloze score reads it);
- `rag`: no memories; the `k` references retrieved with the prompt are put before it as
  text, exactly as the cloze score's `rag` mode lays them out (`m3.inference.rag`).

Two matches, on normalised words (`answer_words`: Unicode NFKC, case folded, every character
that is not a letter or a digit a word break):

- *exact*: the continuation's first words are the answer's words ("Grorchomhou Group." after
  "... works for" matches " Grorchomhou Group"; "the Grorchomhou Group" does not);
- *contains*: the answer's words appear, in order and adjacent, anywhere in the
  continuation (within `max_new_tokens` tokens).

Both come with 95% Wilson intervals, as the cloze accuracies.

```python
scores = evaluate_generation(inference, questions, max_new_tokens=16)
scores["memory"].exact, scores["memory"].exact_interval, scores["rag"].contains
```
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from m3.core.checks import check_int
from m3.core.errors import UserError
from m3.inference.diagnostics import answer_references, answer_token_share
from m3.inference.evaluate import WITHOUT_MEMORY, WithoutMemory, wilson_interval
from m3.inference.generate import Generation, generate_from_ids
from m3.inference.rag import rag_context, rag_references

if TYPE_CHECKING:
    from pathlib import Path

    from m3.data.world import ClozeQuestion
    from m3.inference.loading import Inference
    from m3.recipes import EvaluationSection

GenerationMode = Literal["memory", "none", "rag"]
GENERATION_MODES: tuple[GenerationMode, ...] = ("memory", "none", "rag")
#: Continuations kept per mode in the results, for people to read.
SAMPLES = 3


def answer_words(text: str) -> tuple[str, ...]:
    """The words of a text as the generation metric compares them.

    Unicode NFKC, case folded; every character that is not a letter or a digit (Unicode
    categories L* and N*) separates words, so punctuation and whitespace of any kind and
    amount do not count, and a word is never matched by a part of a longer one.

    Args:
        text: Any text.

    Returns:
        Its words, e.g. `("grorchomhou", "group")` for `" Grorchomhou  Group."`.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = "".join(c if unicodedata.category(c)[0] in "LN" else " " for c in folded)
    return tuple(spaced.split())


def match_answer(continuation: str, answer: str) -> tuple[bool, bool]:
    """Whether a continuation states an answer: first (exact), or anywhere (contains).

    Args:
        continuation: The generated text (the prompt not included).
        answer: The correct option, e.g. `" Grorchomhou Group"`.

    Returns:
        `(exact, contains)`: the continuation's first words are the answer's words; the
        answer's words appear as consecutive words of the continuation. Exact implies contains.

    Raises:
        ValueError: For an answer without a letter or digit.
    """
    want = answer_words(answer)
    if not want:
        raise ValueError(f"the answer {answer!r} has no word to match")
    words = answer_words(continuation)
    exact = words[: len(want)] == want
    contains = exact or any(
        words[i : i + len(want)] == want for i in range(1, len(words) - len(want) + 1)
    )
    return exact, contains


@dataclass(frozen=True)
class GenerationScore:
    """How often greedy generation after the cloze prompts states the answer, in one mode.

    Attributes:
        exact: Share of questions whose continuation starts with the answer's words.
        exact_low: Lower end of its 95% Wilson interval.
        exact_high: Upper end of its 95% Wilson interval.
        contains: Share of questions whose continuation holds the answer's words anywhere.
        contains_low: Lower end of its 95% Wilson interval.
        contains_high: Upper end of its 95% Wilson interval.
        questions: Questions asked.
        max_new_tokens: Tokens generated per question (fewer where EOS came first).
        answer_read: Share of questions whose context read a reference of a document that
            states the answer (`memory`: the prompt's chunks' memories; `rag`: the references
            before the prompt); None for `none`.
        samples: The first continuations: `prompt`, `answer`, `continuation`, `exact`,
            `contains`.
    """

    exact: float
    exact_low: float
    exact_high: float
    contains: float
    contains_low: float
    contains_high: float
    questions: int
    max_new_tokens: int
    answer_read: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exact_interval(self) -> tuple[float, float]:
        """`(exact_low, exact_high)`."""
        return self.exact_low, self.exact_high

    @property
    def contains_interval(self) -> tuple[float, float]:
        """`(contains_low, contains_high)`."""
        return self.contains_low, self.contains_high


def check_modes(modes: Sequence[str]) -> None:
    """Refuse an empty or unknown list of modes, naming the recipe key.

    Args:
        modes: The modes asked for.

    Raises:
        UserError: Naming `evaluation.generation.modes`.
    """
    unknown = sorted(set(modes) - set(GENERATION_MODES))
    if isinstance(modes, str) or not modes or unknown:
        raise UserError(
            f"evaluation.generation.modes must be a non-empty list of {list(GENERATION_MODES)}, "
            f"got {modes!r}"
        )


def _contexts(
    inference: Inference, questions: Sequence[ClozeQuestion], mode: str
) -> tuple[list[list[int]], list[set[int]]]:
    """Per question, the context a mode reads, and (RAG) the references it holds as text."""
    tokenizer = inference.tokenizer
    contexts = [[tokenizer.bos_id, *tokenizer.encode(q.prompt)] for q in questions]
    if mode != "rag":
        return contexts, [set() for _ in questions]
    # as m3.inference.rag.rag_prefixes lays out the cloze score's RAG rows
    found = rag_references(inference.retriever, [q.prompt for q in questions])
    before = [tokenizer.encode(rag_context("", [r.text for r in row])) for row in found]
    rows = [[c[0], *b, *c[1:]] for c, b in zip(contexts, before, strict=True)]
    return rows, [{r.id for r in row} for row in found]


def _generate(
    inference: Inference,
    contexts: list[list[int]],
    mode: str,
    *,
    max_new_tokens: int,
    without_memory: WithoutMemory,
) -> Generation:
    if mode == "memory":  # the prompt's chunks retrieve, the decoded ones swap: as generate
        return generate_from_ids(inference, contexts, max_new_tokens=max_new_tokens)
    warmup = mode == "none" and without_memory == "warmup"
    return generate_from_ids(
        inference, contexts, max_new_tokens=max_new_tokens, mode="warmup" if warmup else "none"
    )


@torch.no_grad()
def evaluate_generation(
    inference: Inference,
    questions: Sequence[ClozeQuestion],
    *,
    modes: Sequence[GenerationMode] = GENERATION_MODES,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    without_memory: WithoutMemory = "empty",
    progress: bool = False,
) -> dict[str, GenerationScore]:
    """Greedy generation after each cloze prompt, scored by whether it states the answer.

    Args:
        inference: The model, tokenizer and retriever over the bank (`load_inference`).
        questions: Cloze questions (`m3.data.world.ClozeQuestion`: prompt, options, answer,
            kb_ids).
        modes: Which of `memory`, `none`, `rag` to score.
        max_new_tokens: Tokens generated per question (a row also stops at EOS).
        batch_size: Questions decoded together.
        without_memory: How the `none` mode reads the model (see
            `m3.inference.evaluate.WITHOUT_MEMORY`).
        progress: Show a progress bar per mode.

    Returns:
        Mode -> score.

    Raises:
        UserError: For no questions, unknown modes or bad sizes (naming the
            `evaluation.generation` key).
    """
    if not questions:
        raise UserError("evaluation.generation needs cloze questions (evaluation.cloze)")
    check_modes(modes)
    check_int(None, "evaluation.generation.max_new_tokens", max_new_tokens, low=1)
    check_int(None, "evaluation.generation.batch_size", batch_size, low=1)
    if without_memory not in WITHOUT_MEMORY:
        raise UserError(f"evaluation.without_memory must be one of {list(WITHOUT_MEMORY)}")
    holders = answer_references(inference.bank.store, questions)
    results: dict[str, GenerationScore] = {}
    for mode in modes:
        contexts, as_text = _contexts(inference, questions, mode)
        exact = contains = read = 0
        samples: list[dict[str, Any]] = []
        starts = range(0, len(questions), batch_size)
        for start in tqdm(starts, desc=f"generation, {mode}", disable=not progress, leave=False):
            rows = range(start, min(start + batch_size, len(questions)))
            out = _generate(
                inference,
                [contexts[q] for q in rows],
                mode,
                max_new_tokens=max_new_tokens,
                without_memory=without_memory,
            )
            for b, q in enumerate(rows):
                question, text = questions[q], out.texts[b]
                hit, found = match_answer(text, question.answer_text)
                exact, contains = exact + hit, contains + found
                seen = as_text[q] | {
                    i for c in out.provenance[b] if c.retrieved_with == "prompt" for i in c.ids
                }
                read += bool(seen & holders[q])
                if len(samples) < SAMPLES:
                    samples.append(
                        {"prompt": question.prompt, "answer": question.answer_text,
                         "continuation": text, "exact": hit, "contains": found}
                    )  # fmt: skip
        n = len(questions)
        results[mode] = GenerationScore(
            exact / n, *wilson_interval(exact, n), contains / n, *wilson_interval(contains, n),
            questions=n, max_new_tokens=max_new_tokens,
            answer_read=None if mode == "none" else read / n, samples=samples,
        )  # fmt: skip
    return results


# ------------------------------------------------------------------------------ the stage


def evaluate_recipe_generation(
    inference: Inference,
    questions: Sequence[ClozeQuestion],
    spec: EvaluationSection,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """The generation metric as `m3 evaluate` runs it from `evaluation.generation`.

    Args:
        inference: The loaded model, tokenizer and bank.
        questions: The cloze questions the evaluation reads (`evaluation.n_questions`).
        spec: The evaluation section; its `generation` must be set.
        progress: Show progress bars.

    Returns:
        `{"generation": mode -> score fields, "answer_tokens_kept":
        `m3.inference.diagnostics.AnswerTokenShare` fields}`, JSON-ready, over the first
        `evaluation.generation.n_questions` questions.
    """
    settings = spec.generation
    if settings is None:
        raise UserError("evaluation.generation is not set")
    asked = list(questions)[: settings.n_questions]
    scores = evaluate_generation(
        inference,
        asked,
        modes=settings.modes,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        without_memory=spec.without_memory,
        progress=progress,
    )
    kept = answer_token_share(inference.bank.store, inference.tokenizer, asked)
    return {"generation": as_plain(scores), "answer_tokens_kept": kept.as_plain()}


def as_plain(scores: dict[str, GenerationScore]) -> dict[str, dict[str, Any]]:
    """Scores as JSON-ready dictionaries, as `evaluation.json` keeps them.

    Args:
        scores: Mode -> score.

    Returns:
        Mode -> the score's fields.
    """
    return {mode: asdict(score) for mode, score in scores.items()}


def kept_sentence(kept: dict[str, Any]) -> str:
    """One line on the answer's tokens that the sparsifier kept.

    Args:
        kept: `AnswerTokenShare.as_plain()` (`evaluation.json`'s `answer_tokens_kept`).

    Returns:
        Markdown text; empty when no answer was located.
    """
    if not kept.get("questions"):
        return ""
    share = torch.tensor(kept["share"])
    layers = ", ".join(f"{v:.0%}" for v in share.mean(1).tolist())
    any_head = ", ".join(f"{v:.0%}" for v in kept["any_head"])
    return (
        f"Answer tokens kept by the sparsifier in the memory of the reference that states "
        f"the answer ({kept['questions']} questions located, {kept['missing']} not): "
        f"**{kept['mean']:.1%}** per layer and head on average (per memory layer: {layers}; "
        f"heads from {float(share.min()):.0%} to {float(share.max()):.0%}); by at least one "
        f"head of the layer: {any_head}."
    )


def generation_markdown(results: dict[str, Any]) -> str:
    """The generation metric as Markdown: one row per mode, the kept share, continuations.

    Args:
        results: What `evaluate_recipe_generation` returns (`evaluation.json`'s
            `generation` and `answer_tokens_kept`).

    Returns:
        Markdown text (empty without scores).
    """
    scores = results.get("generation") or {}
    if not scores:
        return ""
    first = next(iter(scores.values()))
    lines = [
        f"Greedy generation after {first['questions']} cloze prompts ({first['max_new_tokens']} "
        "new tokens): does the continuation state the answer? Exact: its first words are the "
        "answer's; contains: anywhere. 95% Wilson intervals:",
        "",
        "| mode | exact | 95% interval | contains | 95% interval | answer's reference read |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, s in scores.items():
        read = "" if s["answer_read"] is None else f"{s['answer_read']:.1%}"
        lines.append(
            f"| {mode} | {s['exact']:.1%} | {s['exact_low']:.1%} – {s['exact_high']:.1%} | "
            f"{s['contains']:.1%} | {s['contains_low']:.1%} – {s['contains_high']:.1%} | {read} |"
        )
    sentence = kept_sentence(results.get("answer_tokens_kept") or {})
    lines += ["", sentence, ""] if sentence else [""]
    lines += ["| mode | prompt | answer | continuation |", "|---|---|---|---|"]
    for mode, s in scores.items():
        for sample in s["samples"]:
            cells = [sample["prompt"], sample["answer"].strip(), sample["continuation"]]
            shown = [" ".join(c.split()).replace("|", "\\|") for c in cells]
            lines.append(f"| {mode} | {' | '.join(shown)} |")
    return "\n".join([*lines, ""])


def plot_generation(folder: Path, scores: dict[str, dict[str, Any]]) -> Path | None:
    """Bars of the exact and contains shares per mode, with their intervals.

    Args:
        folder: Where `generation.png` goes.
        scores: Mode -> score fields (`as_plain`).

    Returns:
        The PNG, or None for no scores.
    """
    from m3.core.plots import plot_bars

    if not scores:
        return None
    labels, values, errors = [], [], []
    for mode, s in scores.items():
        labels += [f"{mode} exact", f"{mode} contains"]
        values += [s["exact"], s["contains"]]
        errors += [(s["exact_low"], s["exact_high"]), (s["contains_low"], s["contains_high"])]
    questions = next(iter(scores.values()))["questions"]
    return plot_bars(
        folder / "generation.png",
        labels,
        values,
        errors=errors,
        ylabel="share of questions",
        title=f"Answer stated in greedy generation, {questions} questions",
    )
