"""The retriever: query chunks in, the memories each chunk reads out (paper §3.1–§3.2).

`Retriever` composes an `Embedder`, a `MemoryIndex` and a `MemoryStore` (plus a `Tokenizer`
to turn chunk token ids into text for the embedder). For every 64-token query chunk it

1. embeds the chunk's text and searches the index for `k · overfetch` candidates;
2. drops candidates whose overlap (Eq. 6, `overlap`) with the chunk's *leak text* exceeds
   the threshold, checking candidates best first and searching wider when too many leak, so
   that `k` memories remain whenever the index holds enough clean references (steps 1–2:
   `candidates`);
3. reads the kept references' memories (the LRU cache first, then the store) and arranges
   them as `Memories` in the per-chunk layout (chunk `c` sees exactly its own `k`).

**A query that matches nothing retrieves nothing.** A chunk whose embedding is the zero
vector (for `HashedNgramEmbedder`: a text without any token, e.g. only punctuation) is
similar to no reference: it retrieves no reference at all (ids −1, its memories invalid)
rather than `k` arbitrary ones that all score 0. With `min_score=` set, every candidate
scoring at most `min_score` is dropped as well: `min_score=0.0` drops the references a
lexical embedder finds no shared n-gram with, so a chunk shares its `k` slots only among
references that match it.

```python
retriever = Retriever(embedder=embedder, index=index, store=store, tokenizer=tokenizer,
                      model=model, manifest=bank_manifest)
prompt = retriever.retrieve_context(prompt_ids)     # every chunk of every prompt, batched
logits = model(idx, prompt.memories, prefix=prefix)
step = retriever.retrieve_next(contexts)            # at a 64-token boundary while decoding
cache.swap_memories(step.memories, rows)
```

**Which text the leakage filter checks.** A 64-token chunk can never overlap a 128-token
reference by more than 1/2 (the LCS is at most the chunk's length), so checking the chunk
alone would never drop anything. The filter therefore checks a reference against the *query
context the chunk belongs to*: by default the row's context up to and including the chunk
(what the model has read when it attends to those memories: causal, and the same text during
the prompt and while decoding); `leak_texts` replaces it by any text per row, e.g. the whole
evaluation sequence, which also catches references that copy text the model has yet to
predict.

**Batching and overlap.** A prompt's retrievals are all known at once: `retrieve` embeds and
searches chunks in groups of `group_size` and hands each group's store reads to a reader
thread, so reads of group `i` overlap the embedding and search of group `i + 1`
(`HDF5Store` reads with `os.preadv`, which releases the GIL). A call with at most
`group_size` chunks, such as `retrieve_next` at a decoding boundary, runs inline without the
thread hop: the cache first, then one store read of the missing ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from m3.backends.base import MemoryIndex, MemoryStore
from m3.core.checks import as_ids, check_int
from m3.core.errors import UserError
from m3.core.memories import Memories, SparseMemory
from m3.data.chunking import query_chunks
from m3.data.tokenizer import Tokenizer
from m3.retrieval.cache import CacheStats, LRUCache
from m3.retrieval.candidates import Query, select_references
from m3.retrieval.embedders import Embedder

if TYPE_CHECKING:
    from m3.model.memory3 import Memory3

#: One query chunk: its text, or its token ids (decoded with the retriever's tokenizer).
QueryChunk = str | Sequence[int] | Tensor | np.ndarray

#: Token ids of a leak text.
TokenIds = Sequence[int] | Tensor | np.ndarray

#: Phases `Retriever.phase_times` reports, in seconds.
PHASES = ("embed", "search", "filter", "cache", "read", "assemble")

_Row = tuple[Tensor, Tensor, Tensor, Tensor]  # keys, values, valid, positions of one memory


@dataclass
class Retrieval:
    """What a batch of query chunks retrieved.

    Attributes:
        ids: `(B, C, k)` int64 reference ids of each chunk's memories, best first; −1 where
            fewer than `k` clean references were found (all of them for a chunk whose
            embedding is zero, which matches nothing, or that is padding).
        scores: `(B, C, k)` float32 similarities of those references; −inf where `ids` is −1.
        memories: The pool, `M = C · k` memories per row in the per-chunk layout
            (`Memories.per_chunk`): chunk `c` sees slots `c·k .. c·k + k − 1`, empty slots
            invalid. Keys and values are in the store's dtype, on the CPU.
    """

    ids: Tensor
    scores: Tensor
    memories: Memories


class Retriever:
    """Index + store + embedder + LRU memory cache + leakage filter.

    Args:
        embedder: Embeds query chunks; must be the embedder that built the index.
        index: Searches reference embeddings.
        store: Holds the references' memories and token ids. The leakage filter reads the
            token ids through the store's `reference_tokens(ids)` when it has one (a bank
            opened by `m3.bank.open.open_bank` with its reference table: memory-mapped
            arrays), else through `references(ids)` (e.g. an `HDF5Store`, through h5py).
        tokenizer: Decodes chunk token ids into text for the embedder and encodes string
            chunks for the leakage filter; may be None when chunks are given as text and the
            filter is off.
        model: When given, the store must have been written by this model's weights
            (`StoreInfo.check_model`).
        k: Memories per chunk (the paper: 5).
        threshold: Leakage threshold on Eq. 6's overlap (evaluation: 2/3, training: 0.9);
            None turns the filter off.
        overfetch: Candidates searched per chunk, as a multiple of `k`; doubled for the chunks
            that still have fewer than `k` clean references, up to the whole index.
        cache_size: References whose decoded memories the LRU cache keeps; 0 turns it off.
            The reference token ids the filter reads are cached alongside, up to
            `cache_size · overfetch` of them.
        chunk_length: Tokens per query chunk (the paper: 64).
        group_size: Chunks embedded and searched together in a batched call; a call with
            more chunks overlaps the store reads of one group with the next group's work.
            Smaller groups overlap more but search more often: with an exact index and small
            memories one group of 32 was faster than four of 8
            (`benchmarks/retrieval_latency.py`); overlap pays when reads are large or cold.
        min_score: When set, candidates whose similarity is at most this are dropped, like
            leaking ones but without searching wider (an index returns candidates best first,
            so none further down scores more); e.g. 0.0 keeps only references that share
            something with the chunk. None keeps `k` candidates whatever they score. Either
            way a chunk whose embedding is zero retrieves nothing.
        expected_embedder_fingerprint: The embedder fingerprint recorded with the index; the
            embedder must match it.
        manifest: A memory bank's `manifest.json` (as a mapping): its embedder's fingerprint
            is used as `expected_embedder_fingerprint` (give one or the other).
        where: Name of the store for messages; its `path` or class name when None.

    Raises:
        UserError: For a bad setting, an embedder whose fingerprint or dimension differs
            from the index's, a model the store was not written by, or `k` larger than the
            number of stored references.
    """

    def __init__(
        self,
        *,
        embedder: Embedder,
        index: MemoryIndex,
        store: MemoryStore,
        tokenizer: Tokenizer | None = None,
        model: Memory3 | None = None,
        k: int = 5,
        threshold: float | None = 2 / 3,
        overfetch: int = 3,
        cache_size: int = 4096,
        chunk_length: int = 64,
        group_size: int = 32,
        min_score: float | None = None,
        expected_embedder_fingerprint: str | None = None,
        manifest: Mapping[str, Any] | None = None,
        where: str | None = None,
    ) -> None:
        for name, value, low in (
            ("k", k, 1),
            ("overfetch", overfetch, 1),
            ("cache_size", cache_size, 0),
            ("chunk_length", chunk_length, 1),
            ("group_size", group_size, 1),
        ):
            check_int("Retriever", name, value, low=low)
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold <= 1.0
        ):
            raise UserError(f"Retriever threshold must be in [0, 1] or None, got {threshold!r}")
        if min_score is not None and (
            isinstance(min_score, bool)
            or not isinstance(min_score, (int, float))
            or not np.isfinite(min_score)
        ):
            raise UserError(
                f"Retriever min_score must be a finite number or None, got {min_score!r}"
            )
        self.embedder = embedder
        self.index = index
        self.store = store
        self.tokenizer = tokenizer
        self.k = k
        self.threshold = None if threshold is None else float(threshold)
        self.overfetch = overfetch
        self.chunk_length = chunk_length
        self.group_size = group_size
        self.min_score = None if min_score is None else float(min_score)
        self.where = where or str(getattr(store, "path", type(store).__name__))
        self._check_embedder(expected_embedder_fingerprint, manifest)
        if model is not None:
            self.check_model(model)
        stored = len(store)
        if k > stored:
            raise UserError(
                f"{self.where}: k={k} memories per chunk asked for, but the store holds only "
                f"{stored} reference{'s' if stored != 1 else ''}"
            )
        self._memories: LRUCache[_Row] = LRUCache(cache_size)
        self._tokens: LRUCache[list[int]] = LRUCache(cache_size * overfetch)
        self._times = dict.fromkeys(PHASES, 0.0)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # ----------------------------------------------------------------------- checks

    def _check_embedder(self, expected: str | None, manifest: Mapping[str, Any] | None) -> None:
        if manifest is not None:
            if expected is not None:
                raise UserError("give expected_embedder_fingerprint or manifest, not both")
            fingerprint = (manifest.get("embedder") or {}).get("fingerprint")
            if fingerprint is None:
                raise UserError(
                    "the bank manifest has no embedder fingerprint (manifest['embedder']"
                    f"['fingerprint']; keys: {sorted(manifest)})"
                )
            expected = str(fingerprint)
        actual = self.embedder.fingerprint()
        if expected is not None and not self.embedder.matches(expected):
            raise UserError(
                f"the index was built with embedder {expected[:16]}, but the retriever's "
                f"embedder {type(self.embedder).__name__} has fingerprint {actual[:16]}: use "
                "the embedder saved with the bank (fitted weights included) or rebuild the index"
            )
        if self.embedder.dim != self.index.dim:
            raise UserError(
                f"the embedder makes {self.embedder.dim}-dimensional vectors, the index holds "
                f"{self.index.dim}-dimensional ones"
            )

    def check_model(self, model: Memory3) -> None:
        """Refuse a model whose memory shape or weights differ from the store's writer.

        Args:
            model: The model that will read the memories.

        Raises:
            UserError: Naming the differing dimension or both weight fingerprints.
        """
        self.store.info.check_model(
            model.config.memory_shape, model.memory_fingerprint(), where=self.where
        )

    # ------------------------------------------------------------------ statistics

    def cache_stats(self) -> CacheStats:
        """Hits and misses of the memory cache since the last reset."""
        return self._memories.stats()

    def reference_cache_stats(self) -> CacheStats:
        """Hits and misses of the cache of reference token ids the leakage filter reads."""
        return self._tokens.stats()

    def reset_cache(self) -> None:
        """Empty both caches and zero their counters (e.g. between benchmark runs)."""
        self._memories.clear()
        self._tokens.clear()

    def phase_times(self) -> dict[str, float]:
        """Seconds spent per phase since the last `reset_stats` (see `PHASES`).

        "read" is the time store reads took, in the reader thread when they overlap other
        work; the others are spent in the calling thread.
        """
        return dict(self._times)

    def reset_stats(self) -> None:
        """Zero the phase times (the caches and their counters are kept)."""
        self._times = dict.fromkeys(PHASES, 0.0)

    def close(self) -> None:
        """Stop the reader thread (started again when needed)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None
        del state["_pool_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()

    # ------------------------------------------------------------------ public API

    def retrieve(
        self,
        chunks: Sequence[Sequence[QueryChunk | None]],
        *,
        leak_texts: Sequence[TokenIds | None] | None = None,
    ) -> Retrieval:
        """Retrieve the memories of every chunk of a batch of sequences in one call.

        Args:
            chunks: `B` rows of up to `C` chunks each, as text or token ids; rows may be
                shorter than `C`, and a None chunk is padding (it retrieves nothing).
            leak_texts: Per row, the token ids the leakage filter checks every chunk's
                references against (e.g. the whole evaluation sequence); None for a row (or
                for all) checks chunk `c` against the row's chunks `0..c` joined.

        Returns:
            `ids`, `scores` `(B, C, k)` and the per-chunk memory pool `(B, C·k, ...)`.
        """
        if leak_texts is not None and len(leak_texts) != len(chunks):
            raise UserError(f"got {len(leak_texts)} leak texts for {len(chunks)} rows")
        width = max((len(row) for row in chunks), default=0)
        queries: list[Query] = []
        where: list[tuple[int, int]] = []
        for b, row in enumerate(chunks):
            given = None if leak_texts is None else leak_texts[b]
            fixed = None if given is None else _tokens(given, "leak_texts")
            so_far: list[int] = []
            for c, chunk in enumerate(row):
                if chunk is None:
                    continue
                text, ids = self._text_and_ids(chunk)
                leak = None
                if self.threshold is not None:
                    if fixed is None:
                        so_far = so_far + ids
                    leak = fixed if fixed is not None else so_far
                queries.append(Query(text, leak))
                where.append((b, c))
        return self._run(queries, where, len(chunks), width)

    def search(
        self,
        chunks: Sequence[QueryChunk],
        *,
        leak_texts: Sequence[TokenIds | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Embed, search and filter query chunks without reading any memory (e.g. for RAG).

        The same candidates, leakage filter and over-fetching as `retrieve`; the store is
        read only for the filter's reference token ids.

        Args:
            chunks: `N` query chunks, as text or token ids.
            leak_texts: Per chunk, the token ids the filter checks against; None (for one or
                for all) checks a chunk against itself.

        Returns:
            `ids` `(N, k)` int64 (−1 where fewer than `k` clean references were found, e.g.
            all of them for a chunk whose embedding is zero) and `scores` `(N, k)` float32,
            best first.
        """
        if leak_texts is not None and len(leak_texts) != len(chunks):
            raise UserError(f"got {len(leak_texts)} leak texts for {len(chunks)} chunks")
        queries = []
        for n, chunk in enumerate(chunks):
            text, ids = self._text_and_ids(chunk)
            given = None if leak_texts is None else leak_texts[n]
            leak = None
            if self.threshold is not None:
                leak = ids if given is None else _tokens(given, "leak_texts")
            queries.append(Query(text, leak))
        ids = np.full((len(queries), self.k), -1, dtype=np.int64)
        scores = np.full((len(queries), self.k), -np.inf, dtype=np.float32)
        for start in range(0, len(queries), self.group_size):
            group = queries[start : start + self.group_size]
            ids[start : start + len(group)], scores[start : start + len(group)] = (
                self._search_group(group)
            )
        return torch.from_numpy(ids), torch.from_numpy(scores)

    def retrieve_context(
        self,
        contexts: Sequence[TokenIds],
        *,
        leak_texts: Sequence[TokenIds | None] | None = None,
    ) -> Retrieval:
        """Cut token-id contexts into query chunks (`query_chunks`) and retrieve them all.

        Args:
            contexts: `B` contexts of token ids, each counted from its `<s>` (token 0 of
                chunk 0); a partial last chunk retrieves with its partial text.
            leak_texts: As in `retrieve`; by default each chunk is checked against its
                context up to the chunk's end.

        Returns:
            As `retrieve`, with `C` the most chunks of any context.
        """
        rows = []
        for context in contexts:
            ids = _tokens(context, "contexts")
            rows.append([ids[s.start : s.end] for s in query_chunks(len(ids), self.chunk_length)])
        return self.retrieve(rows, leak_texts=leak_texts)

    def retrieve_next(
        self,
        contexts: Sequence[TokenIds],
        *,
        leak_texts: Sequence[TokenIds | None] | None = None,
    ) -> Retrieval:
        """The decoding step: memories for one chunk per row, from each context's last chunk.

        Equals chunk `C − 1` of `retrieve_context(contexts)` (cut at multiples of
        `chunk_length`, so a row at a boundary retrieves with its last complete 64 tokens),
        through a path without a thread hop: the cache first, then one store read.

        Args:
            contexts: `B` contexts of token ids (non-empty), counted from their `<s>`.
            leak_texts: Per row, the text checked by the leakage filter; by default the
                whole context.

        Returns:
            `ids`, `scores` `(B, 1, k)` and memories with `C = 1`, ready for
            `KVCache.swap_memories`.
        """
        if leak_texts is not None and len(leak_texts) != len(contexts):
            raise UserError(f"got {len(leak_texts)} leak texts for {len(contexts)} rows")
        queries = []
        for b, context in enumerate(contexts):
            ids = _tokens(context, "contexts")
            if not ids:
                raise UserError(f"context {b} is empty: nothing to retrieve with")
            start = (len(ids) - 1) // self.chunk_length * self.chunk_length
            leak = None
            if self.threshold is not None:
                given = None if leak_texts is None else leak_texts[b]
                leak = ids if given is None else _tokens(given, "leak_texts")
            queries.append(Query(self._decode(ids[start:]), leak))
        where = [(b, 0) for b in range(len(contexts))]
        return self._run(queries, where, len(contexts), 1)

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise UserError("chunks given as token ids need the retriever's tokenizer")
        return self.tokenizer.decode(ids)

    def _text_and_ids(self, chunk: QueryChunk) -> tuple[str, list[int]]:
        if isinstance(chunk, str):
            if self.threshold is None:
                return chunk, []
            if self.tokenizer is None:
                raise UserError(
                    "the leakage filter needs a tokenizer to check chunks given as text"
                )
            return chunk, self.tokenizer.encode(chunk)
        ids = _tokens(chunk, "chunks")
        return self._decode(ids), ids

    def _timed(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        self._times[phase] += now - start
        return now

    def _run(
        self, queries: list[Query], where: list[tuple[int, int]], batch: int, width: int
    ) -> Retrieval:
        k = self.k
        count = len(queries)
        kept_ids = np.full((count, k), -1, dtype=np.int64)
        kept_scores = np.full((count, k), -np.inf, dtype=np.float32)
        rows: dict[int, _Row] = {}
        fresh: list[int] = []  # ids read from the store in this call
        pending: dict[int, Future[dict[int, _Row]]] = {}
        overlap = count > self.group_size
        for start in range(0, count, self.group_size):
            group = queries[start : start + self.group_size]
            ids, scores = self._search_group(group)
            kept_ids[start : start + len(group)] = ids
            kept_scores[start : start + len(group)] = scores
            clock = time.perf_counter()
            missing = []
            for reference_id in dict.fromkeys(ids[ids >= 0].tolist()):
                if reference_id in rows or reference_id in pending:
                    continue
                row = self._memories.get(reference_id)
                if row is None:
                    missing.append(reference_id)
                else:
                    rows[reference_id] = row
            clock = self._timed("cache", clock)
            if not missing:
                continue
            fresh.extend(missing)
            if overlap:
                future = self._reader().submit(self._read, missing)
                pending.update(dict.fromkeys(missing, future))
            else:
                rows.update(self._read(missing))
        for future in dict.fromkeys(pending.values()):
            rows.update(future.result())
        clock = time.perf_counter()
        for reference_id in fresh:
            self._memories.put(reference_id, rows[reference_id])
        clock = self._timed("cache", clock)
        retrieval = self._assemble(kept_ids, kept_scores, rows, where, batch, width)
        self._timed("assemble", clock)
        return retrieval

    def _reader(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3-reader")
            return self._pool

    def _read(self, ids: list[int]) -> dict[int, _Row]:
        """Read missing memories from the store (possibly in the reader thread)."""
        clock = time.perf_counter()
        memory = self.store.read(torch.tensor(ids, dtype=torch.long))
        fields = (memory.keys, memory.values, memory.valid, memory.positions)
        # own copies: a store may return views into a buffer that it reuses
        out = {i: tuple(f[n].clone() for f in fields) for n, i in enumerate(ids)}
        self._times["read"] += time.perf_counter() - clock
        return out  # type: ignore[return-value]

    def _search_group(self, group: list[Query]) -> tuple[np.ndarray, np.ndarray]:
        """Embed, search and filter a group of queries: `(G, k)` ids and scores."""
        clock = time.perf_counter()
        vectors = self.embedder.embed([q.text for q in group])
        self._timed("embed", clock)
        return select_references(
            group,
            vectors,
            index=self.index,
            k=self.k,
            overfetch=self.overfetch,
            threshold=self.threshold,
            min_score=self.min_score,
            reference_tokens=self._reference_tokens,
            timed=self._timed,
        )

    def _reference_tokens(self, ids: set[int]) -> dict[int, list[int]]:
        """The token ids of candidates: the token cache first, then one read of the rest."""
        out: dict[int, list[int]] = {}
        missing = []
        for reference_id in sorted(ids):
            tokens = self._tokens.get(reference_id)
            if tokens is None:
                missing.append(reference_id)
            else:
                out[reference_id] = tokens
        if missing:
            for reference_id, tokens in zip(missing, self._read_tokens(missing), strict=True):
                out[reference_id] = tokens
                self._tokens.put(reference_id, tokens)
        return out

    def _read_tokens(self, ids: list[int]) -> list[list[int]]:
        """Token ids from the store: its `reference_tokens` when it has one, else `references`.

        A bank's store opened by `m3.bank.open.open_bank` reads them from the bank's reference
        table (memory-mapped arrays, `m3.bank.table`) and an edit's layer for the ids an edit
        wrote; any other store (and a bank built before the table) through `references`.
        """
        lookup = getattr(self.store, "reference_tokens", None)
        if lookup is not None:
            return [array.tolist() for array in lookup(ids)]
        return [list(reference.ids) for reference in self.store.references(ids)]

    def _assemble(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        rows: dict[int, _Row],
        where: list[tuple[int, int]],
        batch: int,
        width: int,
    ) -> Retrieval:
        k = self.k
        out_ids = torch.full((batch, width, k), -1, dtype=torch.long)
        out_scores = torch.full((batch, width, k), -torch.inf, dtype=torch.float32)
        if where:
            b, c = (torch.tensor(x, dtype=torch.long) for x in zip(*where, strict=True))
            out_ids[b, c] = torch.from_numpy(ids)
            out_scores[b, c] = torch.from_numpy(scores)
        unique = list(rows)
        slot = {reference_id: n for n, reference_id in enumerate(unique)}
        if unique:
            pool = SparseMemory(*(torch.stack([rows[i][f] for i in unique]) for f in range(4)))
        else:
            layers, _, heads, tokens, dim = self.store.info.memory_shape
            dtype = self.store.info.torch_dtype
            pool = SparseMemory(
                torch.zeros(1, layers, heads, tokens, dim, dtype=dtype),
                torch.zeros(1, layers, heads, tokens, dim, dtype=dtype),
                torch.zeros(1, tokens, dtype=torch.bool),
                torch.full((1, layers, heads, tokens), -1, dtype=torch.long),
            )
        lookup = np.full(out_ids.numel(), -1, dtype=np.int64)
        flat = out_ids.reshape(-1).numpy()
        present = flat >= 0
        lookup[present] = [slot[i] for i in flat[present].tolist()]
        index = torch.from_numpy(lookup).view(batch, width * k)
        owner = torch.arange(width).repeat_interleave(k)
        visible = (owner[None, :] == torch.arange(width)[:, None]).expand(batch, width, width * k)
        memories = Memories.from_references(pool, index, visible)
        return Retrieval(ids=out_ids, scores=out_scores, memories=memories)


def _tokens(ids: TokenIds | Sequence[int], what: str) -> list[int]:
    return as_ids(ids, where="retriever", what=what).tolist()
