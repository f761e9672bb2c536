"""Storage and search backends: `MemoryStore` and `MemoryIndex` and their implementations.

Importing this package imports every built-in backend, so that the registry lists them
(`m3 components store`); optional libraries (ScaNN) are imported only when used.
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
from m3.backends.scann_index import ScannIndex

__all__ = [
    "CorruptReferenceError",
    "ExactIndex",
    "HDF5Store",
    "InMemoryStore",
    "MemoryIndex",
    "MemoryStore",
    "MissingReferenceError",
    "ScannIndex",
    "SearchResult",
    "StoreInfo",
]
