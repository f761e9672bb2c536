"""Embedders: text -> unit vectors, for retrieving references by similarity (SPEC §4).

The paper embeds each 64-token chunk and each reference with BGE-M3 and searches by cosine
similarity. m3's default is dependency-free and fast: `HashedNgramEmbedder`, a lexical
embedder that hashes word n-grams into a fixed number of buckets (with optional IDF weights
fitted on the knowledge base). Retrieval of the right reference mostly hinges on rare words —
names, numbers, terms — which lexical matching catches well.

Every embedder returns L2-normalised float32 vectors, so cosine similarity is a dot product,
and has a `fingerprint()` that an index records, so that queries are never embedded by
another embedder than the one that built the index.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from m3.errors import UserError

_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(ABC):
    """Maps texts to L2-normalised vectors of a fixed dimension.

    Subclasses implement `embed` and `dim`; stateful ones (fitted weights) also `fit`,
    `save` and `load`.
    """

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the vectors."""

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Embed texts.

        Args:
            texts: `N` strings.

        Returns:
            `(N, dim)` float32, each row of unit length (or zero for a text with no features).
        """

    def fit(self, texts: Iterable[str]) -> None:  # noqa: B027 - most embedders need no fitting
        """Fit corpus statistics (e.g. IDF weights) on the knowledge base; a no-op by default.

        Args:
            texts: The corpus.
        """

    def fingerprint(self) -> str:
        """A sha256 digest of everything that decides the vectors (class and settings)."""
        state = {"class": f"{type(self).__module__}.{type(self).__qualname__}", **self.settings()}
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def settings(self) -> dict:
        """The embedder's settings as plain values (what `fingerprint` hashes)."""
        return {}


class HashedNgramEmbedder(Embedder):
    """Lexical embedder: hashed word n-grams, sublinear term frequency, optional IDF.

    Words are runs of letters and digits (lower-cased by default); each n-gram is hashed
    (CRC-32, stable across processes) into one of `dim` buckets with a ±1 sign, weighted by
    `1 + log(tf)` and, once `fit` has seen a corpus, by its smoothed inverse document
    frequency.

    Args:
        dim: Number of hash buckets (vector dimension).
        ngrams: The n-gram orders used, e.g. `(1, 2)` for words and word pairs.
        lowercase: Lower-case the text first.
    """

    def __init__(
        self, *, dim: int = 2048, ngrams: Sequence[int] = (1, 2), lowercase: bool = True
    ) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise UserError(f"dim must be a positive integer, got {dim!r}")
        orders = tuple(ngrams)
        if not orders or any(not isinstance(n, int) or n < 1 for n in orders):
            raise UserError(f"ngrams must be positive integers, got {list(orders)}")
        self._dim = dim
        self.ngrams = orders
        self.lowercase = lowercase
        self.idf: Tensor | None = None

    @property
    def dim(self) -> int:
        """Dimension of the vectors (number of hash buckets)."""
        return self._dim

    def settings(self) -> dict:
        """Dimension, n-gram orders, case folding and a digest of the fitted IDF weights."""
        idf = "" if self.idf is None else hashlib.sha256(self.idf.numpy().tobytes()).hexdigest()
        return {
            "dim": self._dim,
            "ngrams": list(self.ngrams),
            "lowercase": self.lowercase,
            "idf": idf,
        }

    def _features(self, text: str) -> dict[int, float]:
        words = _WORD.findall(text.lower() if self.lowercase else text)
        counts: dict[int, float] = {}
        for n in self.ngrams:
            for i in range(len(words) - n + 1):
                key = zlib.crc32(" ".join(words[i : i + n]).encode())
                # the low bits pick the bucket, bit 31 the sign (a signed feature hash)
                signed = (key % self._dim + 1) * (1 if key & 0x80000000 else -1)
                counts[signed] = counts.get(signed, 0.0) + 1.0
        return counts

    def fit(self, texts: Iterable[str]) -> None:
        """Fit smoothed IDF weights per bucket: `log((1 + N) / (1 + df)) + 1`.

        Args:
            texts: The corpus (e.g. the knowledge base's references).
        """
        document_frequency = torch.zeros(self._dim, dtype=torch.float64)
        count = 0
        for text in texts:
            buckets = {abs(key) - 1 for key in self._features(text)}
            if buckets:
                document_frequency[list(buckets)] += 1
            count += 1
        if count == 0:
            raise UserError("cannot fit an embedder on an empty corpus")
        self.idf = (torch.log((1 + count) / (1 + document_frequency)) + 1).float()

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Embed texts (see `Embedder.embed`)."""
        out = torch.zeros(len(texts), self._dim)
        for row, text in enumerate(texts):
            for signed, tf in self._features(text).items():
                out[row, abs(signed) - 1] += math.copysign(1.0 + math.log(tf), signed)
        if self.idf is not None:
            out *= self.idf
        return torch.nn.functional.normalize(out, dim=1)

    def save(self, directory: str | Path) -> None:
        """Write the settings and fitted weights to a directory.

        Args:
            directory: Where to write (created if needed).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        settings = {"dim": self._dim, "ngrams": list(self.ngrams), "lowercase": self.lowercase}
        (path / "embedder.json").write_text(json.dumps(settings))
        if self.idf is not None:
            torch.save(self.idf, path / "idf.pt")

    @classmethod
    def load(cls, directory: str | Path) -> HashedNgramEmbedder:
        """Read an embedder that `save` wrote.

        Args:
            directory: Where it was written.

        Returns:
            The embedder, fitted weights included.
        """
        path = Path(directory)
        if not (path / "embedder.json").is_file():
            raise UserError(f"no embedder in {path}: expected {path / 'embedder.json'}")
        embedder = cls(**json.loads((path / "embedder.json").read_text()))
        if (path / "idf.pt").is_file():
            embedder.idf = torch.load(path / "idf.pt")
        return embedder
