"""Storage and search backends: `MemoryStore` and `MemoryIndex` and their implementations.

`base` (the two contracts, `StoreInfo`), the stores `in_memory`, `hdf5_store` (with its file
layout `hdf5_layout`, the h5py side `hdf5_file` and the `preadv` reader `hdf5_reader`),
`sharded` and `cold_start`, the indexes `exact_index`, `scann_index` and `milvus_index` (a
Milvus collection; its connections in `milvus_client`), and what backends share: `checks`
(ids, vectors, writes and manifests checked at the door) and `slots` (where each id lives:
a store's slots, an index's rows).

Importing this package imports every built-in backend, so that the registry lists them
(`m3 components store`); optional libraries (ScaNN, pymilvus) are imported only when used.

May import: `m3.core`, `m3.model`, `m3.memory`.
"""

from m3.backends.base import (
    CorruptReferenceError,
    MemoryIndex,
    MemoryStore,
    MissingReferenceError,
    SearchResult,
    StoreInfo,
)
from m3.backends.exact_index import ExactIndex
from m3.backends.hdf5_store import HDF5Store
from m3.backends.in_memory import InMemoryStore
from m3.backends.milvus_index import MilvusIndex
from m3.backends.scann_index import ScannIndex

__all__ = [
    "CorruptReferenceError",
    "ExactIndex",
    "HDF5Store",
    "InMemoryStore",
    "MemoryIndex",
    "MemoryStore",
    "MilvusIndex",
    "MissingReferenceError",
    "ScannIndex",
    "SearchResult",
    "StoreInfo",
]
