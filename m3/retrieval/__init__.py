"""The read path's search: which references each chunk of text reads (the paper's §3.1).

`embedders` (text to vectors; `sentence`, a local sentence-embedding model; `segmentation`,
what a token is in scripts with and without spaces), `overlap` (the leakage filter, the
paper's Eq. 6), `candidates` (the clean references each chunk keeps: search, drop unmatched
and leaking candidates, search wider), `retriever` (`Retriever`: embed, search, filter,
cache, read, batched over chunks), `cache` (the RAM cache of recently used memories).

May import: `m3.core`, `m3.model`, `m3.data`, `m3.recipes`, `m3.memory`, `m3.backends`.
"""

from __future__ import annotations

from m3.core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        ["PHASES", "CacheStats", "LRUCache", "Retrieval", "Retriever"], "m3.retrieval.retriever"
    ),
)
