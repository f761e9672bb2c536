"""The RAM cache of recently used memories (paper §3.1).

Adjacent chunks often retrieve the same references, so reads are served from RAM first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, NamedTuple, TypeVar

from m3.core.checks import check_int

_V = TypeVar("_V")


class CacheStats(NamedTuple):
    """Counters of the retriever's memory cache.

    Attributes:
        hits: Lookups served from the cache.
        misses: Lookups read from the store.
        size: References cached now.
        capacity: Most references the cache holds (0 = off).
        hit_rate: `hits / (hits + misses)`, 0.0 before any lookup.
    """

    hits: int
    misses: int
    size: int
    capacity: int
    hit_rate: float


class LRUCache(Generic[_V]):
    """A fixed-size least-recently-used map from reference id to a value.

    Args:
        capacity: Most entries kept; 0 keeps nothing (every lookup misses).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = check_int("cache", "capacity", capacity, low=0)
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[int, _V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def keys(self) -> list[int]:
        """Cached ids, least recently used first."""
        return list(self._data)

    def get(self, key: int) -> _V | None:
        """Look an id up, counting a hit or a miss; a hit becomes the most recently used.

        Args:
            key: Reference id.

        Returns:
            The cached value, or None on a miss.
        """
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return value

    def put(self, key: int, value: _V) -> None:
        """Insert (or refresh) an id as the most recently used, evicting the least recent.

        Args:
            key: Reference id.
            value: What to keep for it.
        """
        if self.capacity == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry and zero the counters."""
        self._data.clear()
        self.hits = self.misses = 0

    def stats(self) -> CacheStats:
        """The counters (see `CacheStats`)."""
        total = self.hits + self.misses
        return CacheStats(
            self.hits,
            self.misses,
            len(self._data),
            self.capacity,
            self.hits / total if total else 0.0,
        )
