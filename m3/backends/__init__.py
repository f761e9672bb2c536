"""Storage and search backends: `MemoryStore` and `MemoryIndex` and their implementations."""

from m3.backends.base import (
    CorruptReferenceError,
    MemoryIndex,
    MemoryStore,
    MissingReferenceError,
    SearchResult,
    StoreInfo,
)

__all__ = [
    "CorruptReferenceError",
    "MemoryIndex",
    "MemoryStore",
    "MissingReferenceError",
    "SearchResult",
    "StoreInfo",
]
