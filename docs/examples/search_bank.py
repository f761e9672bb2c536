"""Open a bank that `m3 build-memory` wrote, search its index and read memories.

`python docs/examples/search_bank.py runs/tiny/bank "who founded the observatory?"`.
"""

from __future__ import annotations

import sys

from m3.bank.open import open_bank
from m3.core.memories import SparseMemory


def search(bank: str, question: str, k: int = 5) -> SparseMemory:
    """The memories of the `k` references nearest to `question` (no leakage filter)."""
    opened = open_bank(bank)  # store, index, embedder, manifest
    with opened.store:  # closes the shards' files at the end
        hits = opened.index.search(opened.embedder.embed([question]), k)  # scores, ids (1, k)
        memory = opened.store.read(hits.ids[0])  # keys and values (k, L_mem, H_kv, k_mem, d_h)
        found = zip(hits.ids[0].tolist(), hits.scores[0].tolist(), strict=True)
        for (i, score), reference in zip(found, opened.store.references(hits.ids[0]), strict=True):
            print(i, round(score, 3), reference.doc_id, reference.start, reference.end)
    print(opened.manifest["references"], "references,", opened.manifest["memory_shape"])
    return memory


if __name__ == "__main__":
    search(sys.argv[1], sys.argv[2])
