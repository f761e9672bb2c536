"""Cold start (paper §3.3): a reference is encoded the first time it is read, then kept.

Takes what `m3 build-memory` would from a build-memory recipe (its knowledge base, tokenizer,
chunker and `training.init_weights`), but encodes nothing ahead of time:
`python docs/examples/cold_start.py lazy.h5 recipes/tiny/base.yaml recipes/tiny/build-memory.yaml`.
"""

from __future__ import annotations

import sys

from m3.backends import HDF5Store, StoreInfo
from m3.backends.cold_start import ColdStartStore
from m3.bank.knowledge import read_knowledge
from m3.core import registry
from m3.recipes import Recipe, build, load_recipe
from m3.training.module import Memory3Module


def cold_start(recipe: Recipe, path: str) -> ColdStartStore:
    """A store over the recipe's knowledge base that encodes references on first read."""
    tokenizer = build(recipe, "tokenizer")
    weights = recipe.training.init_weights  # the weights that write the memories
    model = Memory3Module(recipe.model.config(), init_weights=weights).model.eval()
    sources = [registry.instantiate("source", spec) for spec in recipe.data.knowledge]
    references = read_knowledge(sources, tokenizer, chunker=build(recipe, "chunker")).references
    info = StoreInfo(
        memory_shape=model.config.memory_shape,
        dtype="bfloat16",
        model_fingerprint=model.memory_fingerprint(),
    )
    prefix = tokenizer.reference_prefix()
    lazy = ColdStartStore(HDF5Store(path, info=info, mode="a"), model, references, prefix=prefix)
    memory = lazy.read([3, 1])  # encoded now, written, returned
    memory = lazy.read([3])  # served from the store
    print(len(references), "references,", len(lazy), "stored,", lazy.encoded, "encoded")
    print(memory.keys.shape)  # (1, L_mem, H_kv, k, d_h)
    return lazy


if __name__ == "__main__":
    cold_start(load_recipe(sys.argv[2:]), sys.argv[1])
