"""Generation with explicit memory: load a model with its memory bank, then decode (paper §3.1).

`m3.inference.loading.load_inference` opens everything inference needs from a recipe (or a
bank or run folder) and checks that the parts belong together. `generate` then decodes a
batch of prompts:

1. the prompts are processed in one pass (`Memory3.prefill`), each 64-token chunk reading
   the memories its own text retrieved (`Retriever.retrieve_context`; a partial last chunk
   retrieves with its partial text);
2. decoding continues with a KV cache; whenever a row completes a chunk, the chunk's text
   retrieves the memories of the next one (`Retriever.retrieve_next`) and they replace the
   old ones (`KVCache.swap_memories`) without recomputing the context cache; the first
   decoded chunk after a prompt that ends on a boundary inherits the last prompt chunk's
   memories (the same text retrieves the same references);
3. tokens are chosen greedily or sampled (temperature, top-k, top-p, a seeded generator)
   until EOS, `max_new_tokens`, a stop string, or the model's context (`block_size`) is full.

Every row reports its *provenance*: for every chunk of its context, the reference ids (with
their scores and texts) whose memories that chunk read.

```python
from m3.inference.generate import generate
from m3.inference.loading import load_inference

inference = load_inference("runs/tiny/bank")           # the bank, its weights and tokenizer
out = generate(inference, ["Ada Lovelace was born in"], max_new_tokens=64)
out.texts[0]                                           # the continuation
for chunk in out.provenance[0]:                        # which references each chunk read
    print(chunk.chunk, chunk.start, chunk.end, chunk.ids)
```

`generate_from_ids` continues contexts given as token ids, for callers that lay out the
context themselves. Two baselines use the same model and retriever: `mode="none"` reads no
memories (memory mode with an empty pool: the reference prefix and positions stay as in
training), and
`mode="rag"` retrieves `k` references once with the whole prompt as query text and puts
their texts before the prompt (`m3.inference.rag`), reading no memories. `mode="warmup"`
reads the model as a plain causal LM: no reference prefix, no memories, positions from the
context's `<s>` (right for a model trained without memory, and what an exported Hugging Face
checkpoint computes, `m3.inference.export`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from m3.core.checks import check_int, right_pad
from m3.core.errors import UserError
from m3.inference.loading import Inference, load_inference
from m3.inference.rag import (
    RAG_TEMPLATE,
    RetrievedReference,
    rag_context,
    rag_references,
    reference_texts,
)

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer

#: What `generate` can do: read explicit memories, read none, read references as text, or
#: read the model as a plain causal LM (warmup mode: no reference prefix).
Mode = Literal["memory", "none", "rag", "warmup"]
MODES: tuple[str, ...] = ("memory", "none", "rag", "warmup")


# ------------------------------------------------------------------------------ results
@dataclass
class ChunkReferences:
    """The references one chunk of a row's context read (its provenance).

    Attributes:
        chunk: The chunk's index in the context (token 0, the `<s>`, starts chunk 0); −1
            for the references a RAG prompt holds as text.
        start: The first context token that read these memories.
        end: One past the last context token that read them (tokens fed to the model).
        ids: Reference ids, best first (ids of the bank's knowledge base).
        scores: Their similarity scores.
        texts: Their texts (the references' token ids, decoded).
        retrieved_with: "prompt" when the chunk's own prompt text retrieved them, "previous
            chunk" when the previous chunk's text did (while decoding), "inherited" for the
            first decoded chunk after a prompt ending on a boundary, "rag" for a RAG prompt.
    """

    chunk: int
    start: int
    end: int
    ids: list[int]
    scores: list[float]
    texts: list[str]
    retrieved_with: str


@dataclass
class Generation:
    """What `generate` produced for a batch of prompts.

    Attributes:
        prompts: The prompts as given.
        texts: Per row, the generated text (the prompt not included).
        tokens: Per row, the generated token ids (an EOS that ended the row not included).
        contexts: Per row, the token ids the model read before generating: `<s>`, then the
            prompt (for RAG: the references, then the prompt).
        finish_reasons: Per row, "eos", "length" (`max_new_tokens` or the model's
            `block_size` reached) or "stop" (a stop string, `generate`'s `stop`).
        provenance: Per row, the references each chunk of its context read, in chunk order.
        mode: "memory", "none", "rag" or "warmup".
        times: Seconds spent in "retrieve" (every retrieval call, swaps included), "prefill",
            "decode" (the model's decoding steps) and "sample".
    """

    prompts: list[str]
    texts: list[str]
    tokens: list[list[int]]
    contexts: list[list[int]]
    finish_reasons: list[str]
    provenance: list[list[ChunkReferences]]
    mode: str
    times: dict[str, float] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        """Tokens generated over all rows."""
        return sum(len(t) for t in self.tokens)

    def describe(self, row: int, *, references: bool = False) -> str:
        """A row for people, as `m3 generate` prints it.

        Args:
            row: The row.
            references: Also list the references (id, score, text) each chunk read.

        Returns:
            A header line, the prompt with its continuation, and optionally the references.
        """
        tokens, reason = len(self.tokens[row]), self.finish_reasons[row]
        lines = [f"=== {row + 1}: {self.mode}, {tokens} new tokens, stopped at {reason} ==="]
        lines.append(self.prompts[row] + self.texts[row])
        if references:
            lines.append("references:")
            for chunk in self.provenance[row]:
                where = "rag prompt" if chunk.chunk < 0 else f"chunk {chunk.chunk}"
                lines.append(
                    f"  {where}, tokens {chunk.start}-{chunk.end - 1} "
                    f"(retrieved with {chunk.retrieved_with}):"
                )
                for i, score, text in zip(chunk.ids, chunk.scores, chunk.texts, strict=True):
                    shown = " ".join(text.split())
                    shown = shown if len(shown) <= 72 else shown[:71] + "…"
                    lines.append(f"    #{i} ({score:.3f}) {shown}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ sampling
def allowed_logits(logits: Tensor, tokenizer: Tokenizer) -> Tensor:
    """Rule out ids a model should never generate: past the tokenizer's vocabulary, BOS, pad.

    The EOS stays allowed, as it ends a generation, even where it is also the pad id (a
    Llama 3 tokenizer has no pad token) or the BOS (SmolLM2's base tokenizer).

    Args:
        logits: `(B, V)` next-token logits (`V` the model's vocabulary, possibly padded).
        tokenizer: The tokenizer whose ids are allowed.

    Returns:
        `(B, V)` float32 logits with the ruled-out ids at −inf.
    """
    out = logits.float().clone()
    out[:, tokenizer.vocab_size :] = -math.inf
    out[:, sorted({tokenizer.bos_id, tokenizer.pad_id} - {tokenizer.eos_id})] = -math.inf
    return out


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose the next token of every row: greedy, or sampled with temperature, top-k, top-p.

    Args:
        logits: `(B, V)` next-token logits.
        temperature: Divides the logits; 0 picks the most likely token (greedy).
        top_k: Keep the `top_k` most likely tokens (those tied with the k-th kept too).
        top_p: Keep the most likely tokens whose probabilities, summed, first reach `top_p`.
        generator: The random generator of the sampling (on the logits' device).

    Returns:
        `(B,)` long token ids.

    Raises:
        UserError: For a negative temperature, `top_k` < 1 or `top_p` outside (0, 1].
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1:
        probs, order = torch.softmax(scores, -1).sort(-1, descending=True)
        before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
        drop = torch.zeros_like(scores, dtype=torch.bool)
        drop.scatter_(-1, order, before >= top_p)
        scores = scores.masked_fill(drop, -math.inf)
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings out of range, naming the recipe key.

    Args:
        temperature: Must be ≥ 0.
        top_k: None or an int ≥ 1.
        top_p: None or in (0, 1].

    Raises:
        UserError: Naming `generation.temperature`, `generation.top_k` or `generation.top_p`.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise UserError(f"generation.temperature must be a number ≥ 0, got {temperature!r}")
    if not temperature >= 0 or math.isinf(temperature):
        raise UserError(f"generation.temperature must be a finite number ≥ 0, got {temperature}")
    if top_k is not None:
        check_int(None, "generation.top_k", top_k, low=1)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"generation.top_p must be in (0, 1] or null, got {top_p!r}")


def stop_at(text: str, stop: Sequence[str], *, final: bool = False) -> int | None:
    """Where a text is cut at its first stop string (lm-eval's `until`), or None.

    Args:
        text: A row's generated text so far.
        stop: The stop strings (empty ones ignored).
        final: The text is complete; else it may still grow, and a cut counts only once more
            tokens cannot move it: it lies before any trailing U+FFFD (bytes that the next
            token may complete) and no stop string that would start earlier can still complete.

    Returns:
        The index the first stop string starts at, as cutting the complete text finds it
        (for a tokenizer whose decoding of more tokens extends that of fewer).
    """
    settled = text if final else text.rstrip("\ufffd")
    found = [settled.find(s) for s in stop if s and s in settled]
    if not found:
        return None
    first = min(found)
    for s in () if final else stop:  # a longer stop string, begun before `first`, may complete
        begun = range(max(0, len(settled) - len(s) + 1), first)
        if s and any(s.startswith(settled[i:]) for i in begun):
            return None
    return first


# ------------------------------------------------------------------------------ generation
def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], *, block_size: int, what: str = "prompt"
) -> list[list[int]]:
    """Tokenize prompts as contexts: `<s>` then the prompt's ids, each within `block_size`.

    Args:
        tokenizer: The tokenizer.
        prompts: The prompts.
        block_size: Most context tokens the model takes.
        what: How a prompt is named in messages.

    Returns:
        Per prompt, its context token ids.

    Raises:
        UserError: For no prompts, an empty prompt, or one longer than the context.
    """
    if isinstance(prompts, str) or not prompts:
        raise UserError("give a list of one or more prompts")
    contexts = []
    for n, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{what} {n + 1} is empty: nothing to continue")
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        if len(ids) > block_size:
            raise UserError(
                f"{what} {n + 1} is {len(ids)} tokens long (with <s>), longer than the "
                f"model's context, model.block_size = {block_size}"
            )
        contexts.append(ids)
    return contexts


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.times = dict.fromkeys(("retrieve", "prefill", "decode", "sample"), 0.0)
        self.cuda = device.type == "cuda"

    def start(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def stop(self, phase: str, start: float) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times[phase] += time.perf_counter() - start


@torch.no_grad()
def generate(
    inference: Inference,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    mode: Mode = "memory",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
) -> Generation:
    """Continue a batch of prompts, reading explicit memories (or a baseline's context).

    Args:
        inference: The model, tokenizer and retriever (`load_inference`).
        prompts: `B` non-empty prompts.
        max_new_tokens: Most tokens generated per row; a row also stops at EOS or when its
            context reaches the model's `block_size`.
        mode: "memory" (memories per chunk, swapped every `chunk_length` tokens), "none" (no
            memories), "rag" (`k` references as text before the prompt, no memories) or
            "warmup" (warmup mode: no reference prefix, no memories).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: Sample among the `top_k` most likely tokens only.
        top_p: Sample from the smallest set of likeliest tokens whose mass reaches `top_p`.
        seed: Seed of the sampling generator (the same seed gives the same text).
        ignore_eos: Keep generating past EOS (fixed-length rows, e.g. for benchmarks).
        stop: Stop strings (lm-eval's `until`): a row stops once its text holds one for good
            (`stop_at`); the text keeps it (`stop_at(text, stop, final=True)` cuts there).

    Returns:
        Texts, token ids, contexts, finish reasons, provenance and phase times per row.

    Raises:
        UserError: For an empty prompt, a prompt (with its RAG references) longer than the
            model's context, an unknown mode or bad sampling settings.
    """
    if mode not in MODES:
        raise UserError(f"generation.mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_int(None, "generation.max_new_tokens", max_new_tokens, low=1)
    check_sampling(temperature, top_k, top_p)
    tokenizer, retriever = inference.tokenizer, inference.retriever
    block_size = inference.model.config.block_size
    clock = _Clock(inference.device)
    prompts = list(prompts)
    contexts = encode_prompts(tokenizer, prompts, block_size=block_size)
    provenance: list[list[ChunkReferences]] = [[] for _ in contexts]
    if mode == "rag":
        start = clock.start()
        found = rag_references(retriever, prompts)
        clock.stop("retrieve", start)
        rag = [
            rag_context(p, [r.text for r in refs]) for p, refs in zip(prompts, found, strict=True)
        ]
        contexts = encode_prompts(
            tokenizer, rag, block_size=block_size, what="RAG prompt (references + prompt)"
        )
        for b, refs in enumerate(found):
            provenance[b].append(
                ChunkReferences(
                    -1, 0, len(contexts[b]), [r.id for r in refs], [r.score for r in refs],
                    [r.text for r in refs], "rag",
                )
            )  # fmt: skip
    return _decode(
        inference, prompts, contexts, provenance, mode=mode, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos,
        stop=stop, clock=clock,
    )  # fmt: skip


@torch.no_grad()
def generate_from_ids(
    inference: Inference,
    contexts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    mode: Literal["memory", "none", "warmup"] = "memory",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
) -> Generation:
    """Continue contexts given as token ids, as `generate` continues its encoded prompts.

    For callers that lay out the context themselves (`m3.inference.generation_score` reads
    a RAG context exactly as `m3.inference.evaluate` scores it).

    Args:
        inference: The model, tokenizer and retriever (`load_inference`).
        contexts: `B` non-empty token-id contexts, each starting with `<s>`, each within the
            model's `block_size`.
        max_new_tokens: Most tokens generated per row.
        mode: As in `generate`, without "rag" (lay a RAG context out as the rows, and read
            it with "none"): "memory" retrieves and swaps memories, "none" reads none,
            "warmup" reads the model without the reference prefix.
        temperature: As in `generate`.
        top_k: As in `generate`.
        top_p: As in `generate`.
        seed: As in `generate`.
        ignore_eos: As in `generate`.
        stop: As in `generate`.

    Returns:
        As `generate`; `prompts` are the contexts decoded (the `<s>` left out).

    Raises:
        UserError: For an empty context, one longer than the model's context, an unknown
            mode or bad sampling settings.
    """
    if mode not in ("memory", "none", "warmup"):
        raise UserError(f"generate_from_ids: mode must be memory, none or warmup, got {mode!r}")
    check_int(None, "generation.max_new_tokens", max_new_tokens, low=1)
    check_sampling(temperature, top_k, top_p)
    block_size = inference.model.config.block_size
    contexts = [list(c) for c in contexts]
    if not contexts:
        raise UserError("give a list of one or more contexts")
    for n, ids in enumerate(contexts):
        if not ids:
            raise UserError(f"context {n + 1} is empty: nothing to continue")
        if len(ids) > block_size:
            raise UserError(
                f"context {n + 1} is {len(ids)} tokens long, longer than the model's "
                f"context, model.block_size = {block_size}"
            )
    prompts = [inference.tokenizer.decode(ids[1:]) for ids in contexts]
    return _decode(
        inference, prompts, contexts, [[] for _ in contexts], mode=mode,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, ignore_eos=ignore_eos, stop=stop, clock=_Clock(inference.device),
    )  # fmt: skip


def _decode(
    inference: Inference,
    prompts: list[str],
    contexts: list[list[int]],
    provenance: list[list[ChunkReferences]],
    *,
    mode: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    ignore_eos: bool,
    stop: Sequence[str],
    clock: _Clock,
) -> Generation:
    """Prefill the contexts, then decode (the loop `generate` describes).

    Warmup mode reads without the reference prefix; every other mode with it.
    """
    model, tokenizer, retriever = inference.model, inference.tokenizer, inference.retriever
    config = model.config
    chunk = config.chunk_length
    device = inference.device
    batch = len(contexts)
    idx, lengths = right_pad(contexts, tokenizer.pad_id)
    width = idx.shape[1]
    budget = [min(max_new_tokens, config.block_size - len(c)) for c in contexts]
    stop = [stop] if isinstance(stop, str) else list(stop)
    prefix = None if mode == "warmup" else inference.prefix
    cache = model.new_cache(batch, width + max(budget), prefix=prefix)

    memories = None
    if mode == "memory":
        start = clock.start()
        found = retriever.retrieve_context(contexts)
        texts = reference_texts(retriever, found.ids[found.ids >= 0].tolist())
        clock.stop("retrieve", start)
        for b, ids in enumerate(contexts):
            for c in range(-(-len(ids) // chunk)):
                provenance[b].append(
                    _chunk_references(
                        found.ids[b, c], found.scores[b, c], texts, c, chunk, "prompt"
                    )
                )
        memories = found.memories.to(device=device, dtype=cache.keys[0].dtype)
    start = clock.start()
    logits = model.prefill(idx.to(device), cache, lengths=lengths.to(device), memories=memories)
    rows = torch.arange(batch, device=device)
    logits = logits[rows, lengths.to(device) - 1]
    clock.stop("prefill", start)

    generator = torch.Generator(device=device).manual_seed(seed)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finish = ["length" if n == 0 else "" for n in budget]
    while not all(finish):
        start = clock.start()
        tokens = sample_next(
            allowed_logits(logits, tokenizer),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        ).cpu()
        clock.stop("sample", start)
        feed = torch.full((batch,), tokenizer.pad_id, dtype=torch.long)
        for b, token in enumerate(tokens.tolist()):
            if finish[b]:
                continue
            if token == tokenizer.eos_id and not ignore_eos:
                finish[b] = "eos"
                continue
            generated[b].append(token)
            if stop and stop_at(tokenizer.decode(generated[b]), stop) is not None:
                finish[b] = "stop"  # decoding further cannot change the cut text
            elif len(generated[b]) == budget[b]:
                finish[b] = "length"
            else:
                feed[b] = token
        if all(finish):
            break
        if mode == "memory":
            start = clock.start()
            _swap_at_boundaries(inference, cache, contexts, generated, finish, provenance)
            clock.stop("retrieve", start)
        start = clock.start()
        logits = model.decode(feed.to(device), cache)
        clock.stop("decode", start)

    for b in range(batch):  # each chunk's span ends with the last token the model read
        unread = 1 if finish[b] in ("length", "stop") and generated[b] else 0
        read = len(contexts[b]) + len(generated[b]) - unread
        for entry in provenance[b]:
            if entry.chunk >= 0:
                entry.end = min(entry.end, read)
    return Generation(
        prompts=prompts,
        texts=[tokenizer.decode(g) for g in generated],
        tokens=generated,
        contexts=contexts,
        finish_reasons=finish,
        provenance=provenance,
        mode=mode,
        times=clock.times,
    )


def _chunk_references(
    ids: Tensor, scores: Tensor, texts: dict[int, str], c: int, chunk: int, how: str
) -> ChunkReferences:
    keep = ids >= 0
    kept = ids[keep].tolist()
    return ChunkReferences(
        chunk=c,
        start=c * chunk,
        end=(c + 1) * chunk,
        ids=kept,
        scores=scores[keep].tolist(),
        texts=[texts[i] for i in kept],
        retrieved_with=how,
    )


def _swap_at_boundaries(
    inference: Inference,
    cache: Any,
    contexts: list[list[int]],
    generated: list[list[int]],
    finish: list[str],
    provenance: list[list[ChunkReferences]],
) -> None:
    """Give the rows whose next token opens a chunk the memories that chunk reads."""
    chunk = inference.model.config.chunk_length
    lengths = cache.lengths.tolist()
    retrieve, queries = [], []
    for b, length in enumerate(lengths):
        if finish[b] or length % chunk:
            continue
        c = length // chunk
        if length == len(contexts[b]):  # the prompt ended on a boundary: same text, same refs
            last = provenance[b][-1]
            provenance[b].append(
                ChunkReferences(
                    c, c * chunk, (c + 1) * chunk, list(last.ids), list(last.scores),
                    list(last.texts), "inherited",
                )
            )  # fmt: skip
            continue
        retrieve.append(b)
        queries.append(contexts[b] + generated[b][:-1])  # the token being fed opens chunk c
    if not retrieve:
        return
    retriever = inference.retriever
    found = retriever.retrieve_next(queries)
    texts = reference_texts(retriever, found.ids[found.ids >= 0].tolist())
    for n, b in enumerate(retrieve):
        c = lengths[b] // chunk
        provenance[b].append(
            _chunk_references(
                found.ids[n, 0], found.scores[n, 0], texts, c, chunk, "previous chunk"
            )
        )
    device = cache.keys[0].device
    rows = torch.tensor(retrieve, dtype=torch.long, device=device)
    cache.swap_memories(found.memories.to(device=device, dtype=cache.keys[0].dtype), rows)


__all__ = [
    "MODES", "RAG_TEMPLATE", "ChunkReferences", "Generation", "Inference", "Mode",
    "RetrievedReference", "allowed_logits", "check_sampling", "encode_prompts", "generate",
    "generate_from_ids", "load_inference", "rag_context", "rag_references", "sample_next",
    "stop_at",
]  # fmt: skip
