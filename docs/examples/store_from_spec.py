"""The guide's `DirectoryStore` built from its component spec, as a recipe names it.

Run from the repository root (the script's folder, which holds `my_store.py`, is then on the
Python path): `python docs/examples/store_from_spec.py runs/my-bank`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from m3.backends import MemoryStore, StoreInfo
from m3.core.registry import instantiate


def store_from_spec(directory: str) -> MemoryStore:
    """Create the store that `directory-store.yaml` names in `directory`, then reopen it."""
    spec = yaml.safe_load(Path(__file__).with_name("directory-store.yaml").read_text())["store"]
    spec["init_args"]["directory"] = directory  # in place of the file's runs/my-bank
    info = StoreInfo(memory_shape=(2, 2, 2, 8, 16), dtype="bfloat16")  # the tiny model's
    # --8<-- [start:instantiate]
    store = instantiate("store", spec, info=info)  # creates the store
    store = instantiate("store", spec)  # opens it again, reading info.json
    # --8<-- [end:instantiate]
    print(type(store).__name__, store.info.memory_shape, len(store))
    return store


if __name__ == "__main__":
    store_from_spec(sys.argv[1])
