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
from m3.backends.hdf5_store import HDF5Store
from m3.backends.in_memory import InMemoryStore

__all__ = [
    "CorruptReferenceError",
    "HDF5Store",
    "InMemoryStore",
    "MemoryIndex",
    "MemoryStore",
    "MissingReferenceError",
    "SearchResult",
    "StoreInfo",
]
