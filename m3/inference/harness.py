"""m3 as an lm-evaluation-harness model: `lm_eval.simple_evaluate(model="m3", ...)`.

Importing this module registers `M3LM` under the name `m3` in lm-eval's model registry
(lm-eval finds no model outside its own package by itself; `m3 lm-eval` imports this module
and then runs lm-eval's command line). The model reads a model with its memory bank
(`m3.inference.loading.load_inference`) in one of four modes:

- `memory`: explicit memories, read as the paper's evaluation reads them (§3.1, §7): each
  64-token chunk of a request's context retrieves with its own text, references
  overlapping the context by more than the threshold dropped (Eq. 6);
- `none`: memory mode with nothing to read (the reference prefix and positions as with
  memory), the same model's own no-memory baseline;
- `rag`: `k` references retrieved once with the context, read as text before it;
- `warmup`: a plain causal LM (no reference prefix, no memories), as a model trained
  without memory, or its `m3 export`ed checkpoint under lm-eval's `hf` model, computes.

The three request types:

- `loglikelihood(context, continuation)`: the row `<s>` + context + continuation; the
  continuation never takes part in retrieval, and a chunk holding only continuation tokens
  reads the memories of the last chunk with context, so a context shorter than a chunk is
  scored exactly as `m3 evaluate`'s cloze scores a question (`evaluate_cloze`);
- `loglikelihood_rolling(text)`: the text in windows of `<s>` + up to `seq_length` tokens
  (`heldout_sequences`), each window scored as `evaluate_heldout` scores it, under the
  `paper` or `causal` retrieval protocol (the `protocol` model argument);
- `generate_until(context, gen_kwargs)`: greedy batched decoding with `m3 generate`'s loop
  (memories swapped every 64 tokens), at most `max_gen_toks` tokens, cut at the first
  `until` string; a batch stops decoding once every row holds one.

```python
import lm_eval
import m3.inference.harness  # noqa: F401  (registers "m3")

results = lm_eval.simple_evaluate(
    model="m3",
    model_args={"bank": "runs/tiny/bank", "mode": "memory", "k": 5, "threshold": 0.667},
    tasks=["arc_challenge"],
)
```
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models, registered before m3's: see below)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from m3.core.errors import UserError
from m3.core.memories import Memories
from m3.inference.evaluate import heldout_sequences
from m3.inference.generate import generate_from_ids, stop_at
from m3.inference.loading import Inference, load_inference
from m3.inference.rag import rag_prefixes
from m3.inference.scoring import heldout_memories, scored_tokens

__all__ = ["HARNESS_MODES", "M3LM", "PROTOCOLS"]

#: What the `mode` model argument takes.
HARNESS_MODES = ("memory", "none", "rag", "warmup")
#: What the `protocol` model argument takes (retrieval of `loglikelihood_rolling` windows).
PROTOCOLS = ("paper", "causal")
#: Recipe keys in `load_inference`'s messages -> the model argument that sets them.
_KEYS = {
    "retrieval.bank": "bank",
    "training.init_weights": "weights",
    "retrieval.k": "k",
    "retrieval.threshold": "threshold",
}
_DTYPES = ("float32", "bfloat16", "float16")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"model_args {name}={value!r}: give a whole number ≥ 1")
    return value


def _check(mode: str, protocol: str, k: object) -> None:
    if mode not in HARNESS_MODES:
        raise UserError(f"model_args mode={mode!r}: choose one of {', '.join(HARNESS_MODES)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"model_args protocol={protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if k is not None:
        _positive("k", k)


# lm-eval imports its own models only while its registry is empty, so they are imported
# first: registering m3 into an empty registry would hide `hf` and the others
@register_model("m3")
class M3LM(LM):
    """A Memory³ model with its memory bank, as lm-eval's `m3` model.

    Every argument is a model argument (`--model_args bank=…,mode=memory,k=5`); lm-eval's
    `--batch_size` and `--device` reach `batch_size` and `device`.

    Args:
        bank: The memory bank folder (`m3 build-memory`'s output); its recipe gives the
            model, the tokenizer and, unless `weights` is set, the weights that wrote it.
            `mode=warmup` needs none: `weights` (a stage's run folder, or with `recipe`)
            suffices.
        weights: The weights (a `model.pt`, a stage's run folder, a Hugging Face folder).
        recipe: A recipe file to read instead of the bank's own recipe.
        mode: "memory", "none", "rag" or "warmup" (see the module's docstring).
        k: Memories per chunk, and references of `rag`; the recipe's (5) when None.
        threshold: Leakage threshold on Eq. 6's overlap (the paper's evaluation: 2/3);
            None turns the filter off; "recipe" keeps the recipe's.
        protocol: Retrieval of `loglikelihood_rolling` windows: "paper" (each chunk with its
            own text) or "causal" (chunk `c` reads what chunk `c − 1` retrieved).
        seq_length: Tokens per `loglikelihood_rolling` window after its `<s>`; the model's
            `block_size − 1` when None.
        batch_size: Rows per forward pass (requests, or windows, or prompts).
        max_batch_size: Accepted for lm-eval's command line; unused.
        device: Where the model runs (the CPU when None, and when CUDA is asked for where
            there is none: lm-eval's command line asks for `cuda` by default).
        dtype: "float32", "bfloat16" or "float16"; the weights' own when None.
        **unknown: Refused, naming the arguments m3 takes.

    Raises:
        UserError: For an unknown argument or mode, a bad `k`, `batch_size` or
            `seq_length`, or a bank that does not fit the weights (naming the argument).
    """

    def __init__(
        self,
        bank: str | None = None,
        weights: str | None = None,
        recipe: str | None = None,
        mode: str | None = "memory",
        k: int | None = None,
        threshold: float | str | None = "recipe",
        protocol: str = "paper",
        seq_length: int | None = None,
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **unknown: object,
    ) -> None:
        super().__init__()
        if unknown:
            raise UserError(
                f"model_args: m3 takes no argument {', '.join(sorted(unknown))}; it takes "
                "bank, weights, recipe, mode, k, threshold, protocol, seq_length, batch_size, "
                "device, dtype"
            )
        mode = "none" if mode is None else mode  # lm-eval reads `mode=none` as None
        _check(mode, protocol, k)
        if dtype is not None and dtype not in _DTYPES:
            raise UserError(f"model_args dtype={dtype!r}: choose one of {', '.join(_DTYPES)}")
        if bank is None and recipe is None and not (mode == "warmup" and weights is not None):
            raise UserError(
                "model_args bank: name the memory bank folder that m3 build-memory wrote "
                "(bank=runs/tiny/bank), or a recipe that names it (recipe=…); mode=warmup "
                "also runs from weights alone (weights=RUN_FOLDER)"
            )
        if threshold not in (None, "recipe") and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float))
        ):
            raise UserError(f"model_args threshold={threshold!r}: give a number in [0, 1], or None")
        if bank is not None and not Path(bank).is_dir():
            raise UserError(
                f"model_args bank (retrieval.bank): {bank} is not a folder (the memory bank "
                "that m3 build-memory wrote)"
            )
        torch_dtype = getattr(torch, dtype) if dtype else None
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda unless told otherwise (its hf model, too,
            # then runs where it can)
            logging.getLogger(__name__).warning("model_args device=%s: no CUDA here, CPU", device)
            device = "cpu"
        try:
            if bank is None and mode == "warmup":
                self.inference = _without_bank(recipe, weights, device, torch_dtype)
            else:
                self.inference = load_inference(
                    Path(recipe if recipe is not None else bank),  # type: ignore[arg-type]
                    bank=bank,
                    weights=weights,
                    k=k,
                    threshold=threshold,  # type: ignore[arg-type]
                    device=device,
                    dtype=torch_dtype,
                )
        except UserError as error:
            raise UserError(_named(str(error))) from None
        self._configure(mode, protocol, seq_length, batch_size)

    @classmethod
    def from_inference(
        cls,
        inference: Inference,
        *,
        mode: str = "memory",
        protocol: str = "paper",
        seq_length: int | None = None,
        batch_size: int = 16,
    ) -> M3LM:
        """The model over an already loaded model and bank (several modes, one load).

        Args:
            inference: What `load_inference` opened; closing it is the caller's.
            mode: "memory", "none", "rag" or "warmup".
            protocol: Retrieval of `loglikelihood_rolling` windows: "paper" or "causal".
            seq_length: Tokens per rolling window after its `<s>`; `block_size − 1` if None.
            batch_size: Rows per forward pass.

        Returns:
            The lm-eval model.
        """
        _check(mode, protocol, None)
        self = cls.__new__(cls)
        LM.__init__(self)
        self.inference = inference
        self._configure(mode, protocol, seq_length, batch_size)
        return self

    def _configure(
        self, mode: str, protocol: str, seq_length: int | None, batch_size: int | str
    ) -> None:
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)  # lm-eval's --batch_size arrives as text
        self.batch_size = _positive("batch_size", batch_size)
        self.mode = mode
        self.protocol = protocol
        config = self.inference.model.config
        self.block_size = config.block_size
        self.chunk = config.chunk_length
        self.seq_length = config.block_size - 1 if seq_length is None else seq_length
        _positive("seq_length", self.seq_length)
        self._device = self.inference.device

    # ------------------------------------------------------------------ lm-eval's API

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        """Log-likelihood of each request's continuation after its context.

        Args:
            requests: lm-eval `Instance`s whose `args` are `(context, continuation)`.
            disable_tqdm: Hide the progress bar.

        Returns:
            Per request, `(summed log-probability, whether greedy decoding gives it)`.
        """
        pairs = [tuple(r.args) for r in requests]
        results = self.score_pairs(pairs, progress=not disable_tqdm)  # type: ignore[arg-type]
        for pair, result in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, every token predicted once.

        Args:
            requests: lm-eval `Instance`s whose `args` are `(text,)`.
            disable_tqdm: Hide the progress bar.

        Returns:
            Per request, the summed log-probability of its tokens.
        """
        texts = [r.args[0] for r in requests]
        results = self.score_texts(texts, progress=not disable_tqdm)
        for text, result in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first `until` string.

        Args:
            requests: lm-eval `Instance`s whose `args` are `(context, gen_kwargs)`;
                `gen_kwargs` may hold `until` (a string or strings), `max_gen_toks` (256 by
                default), `do_sample` and `temperature`.
            disable_tqdm: Hide the progress bar.

        Returns:
            Per request, the generated text.
        """
        out = self.continue_texts([tuple(r.args) for r in requests], progress=not disable_tqdm)
        for request, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out

    # ------------------------------------------------------------------ m3's scoring

    def score_pairs(
        self, pairs: Sequence[tuple[str, str]], *, progress: bool = False
    ) -> list[tuple[float, bool]]:
        """Score `(context, continuation)` pairs, batched (what `loglikelihood` runs).

        A context's trailing whitespace moves to its continuation (as lm-eval's own models
        do); the row is `<s>` + the context's ids + the continuation's ids, keeping `<s>`
        and the last `block_size − 1` tokens of a longer row.

        Args:
            pairs: `(context, continuation)` texts.
            progress: Show a progress bar.

        Returns:
            Per pair, `(summed log-probability, whether every token is the argmax)`.
        """
        tokenizer = self.inference.tokenizer
        split = []
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            split.append((context, continuation))
        before: list[list[int]] = [[] for _ in split]
        if self.mode == "rag":  # one retrieval per distinct context, as text before it
            asked = sorted({c for c, _ in split if c})
            texts = rag_prefixes(self.inference.retriever, tokenizer, asked) if asked else []
            found = dict(zip(asked, texts, strict=True))
            before = [found.get(c, []) for c, _ in split]
        rows, contexts = [], []
        for (context, continuation), refs in zip(split, before, strict=True):
            ids, tail = tokenizer.encode(context), tokenizer.encode(continuation)
            rows.append(self._fit([tokenizer.bos_id, *refs, *ids, *tail], len(tail)))
            contexts.append((ids, len(rows[-1]) - len(tail)))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)

        def score(batch: list[int]) -> None:
            batch_rows = [rows[n] for n in batch]
            scored_from = [contexts[n][1] for n in batch]
            memories = None
            if self.mode == "memory":
                memories = self._context_memories(
                    batch_rows, scored_from, [contexts[n][0] for n in batch]
                )
            token_logp, hits, mask = scored_tokens(
                self.inference.model, batch_rows, scored_from, memories, self._prefix
            )
            sums = (token_logp * mask).sum(-1).tolist()
            greedy = ((hits >= 1) | ~mask).all(-1).tolist()
            for n, total, best in zip(batch, sums, greedy, strict=True):
                out[n] = (float(total), bool(best))

        self._batched(rows, score, "loglikelihood", progress)
        return out

    def score_texts(self, texts: Sequence[str], *, progress: bool = False) -> list[float]:
        """Summed log-probabilities of whole texts (what `loglikelihood_rolling` runs).

        Each text is cut by `heldout_sequences` into windows of `<s>` + up to `seq_length`
        tokens, and each window is scored as `evaluate_heldout` scores it.

        Args:
            texts: The texts.
            progress: Show a progress bar.

        Returns:
            Per text, the summed log-probability of its tokens (0 for a text without any).
        """
        tokenizer = self.inference.tokenizer
        windows, owners = [], []
        for n, text in enumerate(texts):
            if tokenizer.encode(text):
                found = heldout_sequences(
                    tokenizer, [text], seq_length=self.seq_length, max_sequences=None
                )
                windows += found
                owners += [n] * len(found)
        out = [0.0] * len(texts)

        def score(batch: list[int]) -> None:
            rows, scored_from, memories = [windows[n] for n in batch], [1] * len(batch), None
            if self.mode == "memory":
                memories = heldout_memories(
                    self.inference.retriever,
                    rows,
                    chunk_length=self.chunk,
                    protocol=self.protocol,  # type: ignore[arg-type]
                )
            elif self.mode == "rag":
                queries = [tokenizer.decode(w[1:]) for w in rows]
                before = rag_prefixes(self.inference.retriever, tokenizer, queries)
                rows = [
                    self._fit([w[0], *b, *w[1:]], len(w) - 1, key="seq_length")
                    for w, b in zip(rows, before, strict=True)
                ]
                scored_from = [
                    len(r) - len(windows[n]) + 1 for r, n in zip(rows, batch, strict=True)
                ]
            token_logp, _, mask = scored_tokens(
                self.inference.model, rows, scored_from, memories, self._prefix
            )
            for n, total in zip(batch, (token_logp * mask).sum(-1).tolist(), strict=True):
                out[owners[n]] += float(total)

        self._batched(windows, score, "loglikelihood_rolling", progress)
        return out

    def continue_texts(
        self, requests: Sequence[tuple[str, dict[str, Any]]], *, progress: bool = False
    ) -> list[str]:
        """Greedy continuations of contexts (what `generate_until` runs).

        Requests with the same `gen_kwargs` are decoded together, `batch_size` at a time, by
        `m3.inference.generate.generate_from_ids` in this model's mode, from `<s>` + the
        context's ids (`rag`: `<s>` + the references + the context's ids, as `score_pairs`
        and `m3 evaluate` lay them out, read without memories). A batch stops decoding once
        each of its rows holds an `until` string that more tokens cannot move
        (`m3.inference.generate.stop_at`), which gives the text that decoding all
        `max_gen_toks` tokens and cutting would.

        Args:
            requests: `(context, gen_kwargs)` pairs.
            progress: Show a progress bar.

        Returns:
            Per request, the generated text up to its first `until` string.

        Raises:
            UserError: For a context (with `<s>` and RAG references) longer than the model's.
        """
        groups: dict[str, list[int]] = {}
        for n, (_, kwargs) in enumerate(requests):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(n)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=not progress)
        for members in groups.values():
            kwargs = dict(requests[members[0]][1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            steps = _positive("max_gen_toks", kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                found = generate_from_ids(
                    self.inference,
                    self._generation_contexts([requests[n][0] for n in batch]),
                    max_new_tokens=steps,
                    mode="none" if self.mode == "rag" else self.mode,  # type: ignore[arg-type]
                    temperature=temperature,
                    stop=until,
                )
                for n, text in zip(batch, found.texts, strict=True):
                    cut = stop_at(text, until, final=True)
                    out[n] = text if cut is None else text[:cut]
                bar.update(len(batch))
        bar.close()
        return out

    # ------------------------------------------------------------------ internals

    @property
    def _prefix(self) -> torch.Tensor | None:
        return None if self.mode == "warmup" else self.inference.prefix

    def _fit(self, row: list[int], scored: int, *, key: str = "continuation") -> list[int]:
        """`<s>` and the last `block_size − 1` tokens of a row too long for the model."""
        if len(row) <= self.block_size:
            return row
        if scored > self.block_size - 1:
            raise UserError(
                f"a {key} of {scored} tokens does not fit the model's context "
                f"(block_size {self.block_size}, with <s>)"
                + ("; give a smaller model_args seq_length" if key == "seq_length" else "")
            )
        return [row[0], *row[len(row) - self.block_size + 1 :]]

    def _generation_contexts(self, contexts: list[str]) -> list[list[int]]:
        """`<s>` + each context's ids; with `rag`, the references' ids between them."""
        tokenizer = self.inference.tokenizer
        before: dict[str, list[int]] = {}
        if self.mode == "rag":  # one retrieval per distinct context, as score_pairs
            asked = sorted({c for c in contexts if c})
            texts = rag_prefixes(self.inference.retriever, tokenizer, asked) if asked else []
            before = dict(zip(asked, texts, strict=True))
        rows = [[tokenizer.bos_id, *before.get(c, []), *tokenizer.encode(c)] for c in contexts]
        for row in rows:
            if len(row) > self.block_size:
                raise UserError(
                    f"a generate_until context of {len(row)} tokens (with <s>"
                    + (" and its RAG references" if self.mode == "rag" else "")
                    + f") does not fit the model's context (block_size {self.block_size})"
                )
        return rows

    def _context_memories(
        self, rows: list[list[int]], scored_from: list[int], contexts: list[list[int]]
    ) -> Memories:
        """Each chunk's memories: its own context text retrieves them (continuation excluded).

        A chunk with no context token reads the memories of the last chunk that had some;
        the leakage filter checks every chunk's references against the request's context.
        """
        chunk = self.chunk
        queries: list[list[list[int] | None]] = []
        last = []
        for row, end in zip(rows, scored_from, strict=True):
            spans = []
            for start in range(0, len(row), chunk):
                text = row[max(start, 1) : min(start + chunk, end)]
                spans.append(text if start < end and text else None)
            queries.append(spans)
            last.append((end - 1) // chunk)
        found = self.inference.retriever.retrieve(queries, leak_texts=contexts).memories  # type: ignore[arg-type]
        visible = found.visible.clone()
        for b, c in enumerate(last):
            visible[b, c + 1 :] = visible[b, c]
        return Memories(found.keys, found.values, found.valid, visible)

    def _batched(
        self, rows: list[list[int]], score: Callable[[list[int]], None], what: str, progress: bool
    ) -> None:
        """Call `score` on batches of row indices, longest rows first."""
        order = sorted(range(len(rows)), key=lambda n: -len(rows[n]))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=what, disable=not progress, leave=False):
            score(order[start : start + self.batch_size])


def _without_bank(
    recipe: str | None, weights: str | None, device: str | None, dtype: torch.dtype | None
) -> Inference:
    """A model and its tokenizer for `mode=warmup`, read without a bank (no retriever)."""
    from m3.model.checkpoints import load_weights
    from m3.model.memory3 import Memory3
    from m3.recipes import build_tokenizer, load_recipe

    folder = Path(weights) if weights is not None else None
    if recipe is None and folder is not None and (folder / "recipe.yaml").is_file():
        recipe = str(folder / "recipe.yaml")  # a stage's run folder: its recipe and model.pt
    if recipe is None:
        raise UserError(
            "model_args recipe: without a bank, name the recipe of the weights (recipe=…), "
            "or give a stage's run folder as weights"
        )
    loaded = load_recipe(recipe)
    if loaded.tokenizer is None:
        raise UserError(f"model_args recipe: {recipe} names no tokenizer")
    named = weights if weights is not None else loaded.training.init_weights
    if named is None:
        raise UserError(f"model_args weights: name the weights ({recipe} names none)")
    path = Path(named)
    if path.is_dir() and (path / "model.pt").is_file():
        path = path / "model.pt"
    if not path.exists():
        raise UserError(f"model_args weights: {path} does not exist")
    model = Memory3(loaded.model.config())
    load_weights(model, path)
    model = model.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
    tokenizer = build_tokenizer(loaded)
    prefix = torch.tensor(tokenizer.reference_prefix(), device=model.lm_head.weight.device)
    # no retriever nor bank: warmup mode reads neither
    return Inference(model, tokenizer, None, None, prefix, loaded, path)  # type: ignore[arg-type]


def _named(message: str) -> str:
    """`load_inference`'s message, with the model argument that sets its recipe key."""
    for key, argument in _KEYS.items():
        if message.startswith(f"{key}:") or message.startswith(f"{key} "):
            return f"model_args {argument} ({key}){message[len(key) :]}"
    return f"model_args: {message}"
