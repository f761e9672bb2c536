"""Tokenizers: a minimal `Tokenizer` base class and two adapters.

m3 needs little from a tokenizer: `encode` without special tokens, `decode` that never fails
on what a model generates, the three special ids, and the memory prefix `<s>Reference:`
that replaces the BOS of every reference (paper §3.3). Any tokenizer fits through a short
subclass:

```python
from m3.data.tokenizer import ByteTokenizer, HFTokenizer

tok = ByteTokenizer()                              # no files, no dependencies
tok = HFTokenizer.train(texts, vocab_size=2048)    # a byte-level BPE in seconds
tok = HFTokenizer("tokenizer.json")                # any Hugging Face `tokenizers` file
tok.reference_prefix()                             # ids of `<s>Reference:`
tok.save("run/tokenizer"); Tokenizer.load("run/tokenizer")
```

Importing this module is cheap: it never imports torch, and `tokenizers` is imported only
when an `HFTokenizer` is built.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3.core import registry
from m3.core.errors import UserError
from m3.data.special_tokens import AUTO, DEFAULTS, resolve_special_tokens

if TYPE_CHECKING:
    import tokenizers

#: Text that follows the BOS in the prefix of every reference (paper §3.3).
REFERENCE_TEXT = "Reference:"

#: File that `Tokenizer.save` writes to describe the saved tokenizer.
MANIFEST = "m3_tokenizer.json"

# Text on which the default fingerprint observes a tokenizer: ASCII, accents, CJK, emoji,
# whitespace runs and the reference prefix.
_PROBE = "Reference: The quick brown fox, 1234.\n\n\tdéjà vu — 記憶 😀  <s></s><pad>"


def _as_ints(ids: Sequence[int]) -> list[int]:
    # Accept lists, tuples, numpy arrays and 1-D tensors alike without importing either.
    tolist = getattr(ids, "tolist", None)
    values = tolist() if callable(tolist) else ids
    return [int(i) for i in values]


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


class Tokenizer(abc.ABC):
    """What m3 needs from a tokenizer: text to ids and back, plus three special ids.

    Subclass it explicitly (registries find tokenizers through `Tokenizer.__subclasses__()`)
    and implement `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id` and `pad_id`.
    Override `fingerprint` to hash the full mapping, and `_save_files` / `_from_saved` to
    support `save` and `load`.
    """

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Turn text into token ids, adding no special tokens.

        Args:
            text: The text to encode. Special-token strings such as `"<s>"` in it are
                ordinary text, never special ids.

        Returns:
            The token ids.
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Turn token ids into text, skipping special ids.

        Must not raise on any sequence of integers, since it decodes what a model generates.

        Args:
            ids: Token ids (a list, tuple, numpy array or 1-D tensor).

        Returns:
            The text.
        """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special ids included; every id lies in `0..vocab_size - 1`."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token `<s>`."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """Id of the end-of-sequence token `</s>`."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id used to pad sequences; it takes no part in attention or loss."""

    def reference_prefix(self) -> list[int]:
        """Ids of the memory prefix `<s>Reference:`, which replaces a reference's BOS.

        Returns:
            `[bos_id] + encode("Reference:")`.
        """
        return [self.bos_id, *self.encode(REFERENCE_TEXT)]

    def fingerprint(self) -> str:
        """A sha256 hex digest of what defines this tokenizer's mapping.

        Stores and checkpoints record it so that memories are never read back through a
        different tokenizer. This default hashes the class, the vocabulary size, the special
        ids and the encoding of a fixed probe text, so it catches most differences but not
        all; subclasses that can should hash their full definition instead.

        Returns:
            64 hex characters.
        """
        return _sha256(
            {
                "class": registry.identity(type(self)),
                "vocab_size": self.vocab_size,
                "special": [self.bos_id, self.eos_id, self.pad_id],
                "probe": self.encode(_PROBE),
            }
        )

    def save(self, directory: str | Path) -> Path:
        """Write this tokenizer to a directory that `Tokenizer.load` reads back.

        The directory receives the files the tokenizer needs plus `m3_tokenizer.json`, which
        names the class, its constructor arguments and the fingerprint.

        Args:
            directory: Where to write; created when missing.

        Returns:
            The directory.

        Raises:
            NotImplementedError: When the subclass does not support saving.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        init_args = self._save_files(directory)
        manifest = {
            "class_path": registry.identity(type(self)),
            "init_args": init_args,
            "fingerprint": self.fingerprint(),
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer written by `save`, whatever its class.

        Args:
            directory: A directory written by `save`.

        Returns:
            The tokenizer, with the fingerprint it was saved with.

        Raises:
            UserError: When the directory holds no saved tokenizer, names a class that is not
                a subclass of the class `load` was called on, or its files changed since.
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"no saved tokenizer in {str(directory)!r}: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            class_path = manifest["class_path"]
            init_args = dict(manifest["init_args"])
            expected = manifest["fingerprint"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{str(manifest_path)!r} is not a valid tokenizer manifest") from err
        try:
            found = registry.class_of(str(class_path))
        except UserError as err:
            raise UserError(f"{str(manifest_path)!r} names unknown class {class_path!r}") from err
        if not (isinstance(found, type) and issubclass(found, cls)):
            raise UserError(
                f"{str(manifest_path)!r} holds a {getattr(found, '__qualname__', class_path)} "
                f"({class_path}), not a {cls.__qualname__}"
            )
        tokenizer = found._from_saved(directory, init_args)
        if tokenizer.fingerprint() != expected:
            raise UserError(
                f"the tokenizer in {str(directory)!r} changed since it was saved "
                "(its fingerprint differs from the one in the manifest)"
            )
        return tokenizer

    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write the files this tokenizer needs and return its constructor arguments.

        Paths among the returned arguments are relative to `directory`.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not support save()")

    @classmethod
    def _from_saved(cls, directory: Path, init_args: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from the arguments that `_save_files` returned."""
        return cls(**init_args)

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0–255 are bytes, then `<s>` 256, `</s>` 257, `<pad>` 258.

    Needs no files and no training, which suits tests and tiny experiments. For real runs
    prefer a BPE (`HFTokenizer`): a memory keeps 8 tokens per head, and with bytes those
    are 8 characters rather than 8 words.
    """

    _BOS, _EOS, _PAD = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        """Encode text as its UTF-8 bytes.

        Args:
            text: The text to encode.

        Returns:
            One id per byte, each in 0–255.

        Raises:
            UserError: When the text holds a lone surrogate, which has no UTF-8 form.
        """
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise UserError(
                f"text is not valid Unicode: {err.reason} at position {err.start}"
            ) from err

    def decode(self, ids: Sequence[int]) -> str:
        """Decode bytes as UTF-8, skipping special and out-of-range ids.

        Args:
            ids: Token ids, possibly generated by a model.

        Returns:
            The text; invalid UTF-8 becomes U+FFFD instead of raising.
        """
        data = bytes(i for i in _as_ints(ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        """259: 256 bytes and three special ids."""
        return 259

    @property
    def bos_id(self) -> int:
        """256."""
        return self._BOS

    @property
    def eos_id(self) -> int:
        """257."""
        return self._EOS

    @property
    def pad_id(self) -> int:
        """258."""
        return self._PAD

    def fingerprint(self) -> str:
        """A sha256 hex digest of the byte mapping and the special ids.

        Returns:
            64 hex characters, the same for every `ByteTokenizer`.
        """
        return _sha256({"class": "m3.ByteTokenizer", "bytes": 256, "special": [256, 257, 258]})

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: the better default for real runs.

    Build it in one of three ways:

    - `HFTokenizer("checkpoints/llama-1b")` (or `HFTokenizer.from_file(...)`) loads the
      `tokenizer.json` of a checkpoint's folder, with the BOS, EOS and pad tokens its
      `tokenizer_config.json` or `special_tokens_map.json` name (`m3.data.special_tokens`);
    - `HFTokenizer.train(texts, vocab_size=2048)` trains a byte-level BPE from Python strings;
    - `HFTokenizer(train_files=[...], vocab_size=2048, cache="runs/bpe")` trains from files,
      which is how a recipe says it:

      ```yaml
      tokenizer:
        class_path: HFTokenizer
        init_args: {train_files: [data/train.txt], vocab_size: 2048, cache: runs/bpe}
      ```

      With `cache`, the trained tokenizer is saved there and reused by later runs as long
      as the training files and settings are unchanged (they are hashed): later runs skip
      the training and keep the same ids even if another `tokenizers` version would train
      differently. When the files or settings change, the BPE is retrained and the cache
      overwritten.

    A trained BPE is byte-level: every string encodes, and decoding what was encoded
    gives back the string exactly. Strings such as `"<s>"` inside the text are encoded as
    text, never as special ids.

    Args:
        path: A `tokenizer.json` file, or a directory holding one. Give either this or
            `train_files`.
        train_files: UTF-8 text files to train a byte-level BPE on.
        vocab_size: Vocabulary size of the trained BPE, special tokens included (at least
            259: 256 bytes and 3 special tokens). A small corpus may yield fewer ids.
        min_frequency: Fewest occurrences of a pair for the BPE to merge it.
        cache: Directory to save the trained BPE in and to reuse it from.
        bos_token: Text of the token that starts every context and the reference prefix.
            `"auto"`: the one the checkpoint's `tokenizer_config.json` (or
            `special_tokens_map.json`) names, else `<s>`. A tokenizer trained without one
            (Qwen2.5, Qwen3: `"bos_token": null`) needs it set, e.g. to `"<|endoftext|>"`.
        eos_token: Text of the EOS token; `"auto"`: the checkpoint's, else `</s>`.
        pad_token: Text of the padding token; `None` pads with the EOS id. `"auto"`: the
            checkpoint's (its `null` pads with the EOS id), else `<pad>` when the vocabulary
            has it, else the EOS id.

    Raises:
        UserError: For a missing file, a missing special token, a checkpoint that names no
            BOS or EOS while the argument is `"auto"`, or inconsistent arguments.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        train_files: list[str] | None = None,
        vocab_size: int = 4096,
        min_frequency: int = 2,
        cache: str | None = None,
        bos_token: str = AUTO,
        eos_token: str = AUTO,
        pad_token: str | None = AUTO,
    ) -> None:
        specials = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        if (path is None) == (train_files is None):
            raise UserError("HFTokenizer needs exactly one of path (a file) and train_files")
        if train_files is None:
            if cache is not None:
                raise UserError("HFTokenizer: cache applies to train_files, not to path")
            file = _tokenizer_file(str(path))
            hf = _read_tokenizer_file(file)
            specials = resolve_special_tokens(
                specials, directory=file.parent, token_to_id=hf.token_to_id, source=str(file)
            )
            self._init(hf, source=str(path), **specials)
            return
        # a BPE m3 trains has m3's own names: "auto" is <s>, </s>, <pad>
        specials = {k: DEFAULTS[k] if v == AUTO else v for k, v in specials.items()}
        files = [Path(f) for f in train_files]
        if not files:
            raise UserError("HFTokenizer: train_files is empty")
        for f in files:
            if not f.is_file():
                raise UserError(f"tokenizer training file not found: {str(f)!r}")
        _check_training_args(vocab_size, min_frequency)
        key = self._training_key(files, vocab_size, min_frequency, specials)
        cached = Path(cache) / "tokenizer.json" if cache is not None else None
        if cached is not None and cached.is_file() and _read_key(cached.parent) == key:
            self._init(_read_tokenizer_file(cached), source=str(cached), **specials)
            return
        hf, trainer = _untrained_bpe(vocab_size, min_frequency, specials)
        try:
            hf.train([str(f) for f in files], trainer=trainer)
        except Exception as err:  # e.g. a file that is not UTF-8; the Rust side says which
            raise UserError(f"cannot train a tokenizer on {train_files}: {err}") from err
        self._init(hf, source="training", **specials)
        if cached is not None:
            self.save(cached.parent)
            (cached.parent / "training.json").write_text(json.dumps({"key": key}) + "\n")

    def _init(
        self,
        hf: tokenizers.Tokenizer,
        *,
        source: str,
        bos_token: str,
        eos_token: str,
        pad_token: str | None,
    ) -> None:
        # Special-token strings in user text are text: "<s>" in a document is not a BOS.
        # The flag is not part of tokenizer.json, so it is set on every load.
        hf.encode_special_tokens = True
        self._hf = hf
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        ids = {}
        for name, token in self._tokens.items():
            if token is None:
                continue
            token_id = hf.token_to_id(token)
            if token_id is None:
                raise UserError(
                    f"tokenizer from {source!r} has no {name} {token!r}; "
                    f"pass {name}= with one of its special tokens"
                )
            ids[name] = token_id
        self._bos = ids["bos_token"]
        self._eos = ids["eos_token"]
        self._pad = ids.get("pad_token", self._eos)
        self._size = hf.get_vocab_size(with_added_tokens=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The wrapped tokenizer pickles as its JSON definition, which lacks the flag.
        self.__dict__.update(state)
        self._hf.encode_special_tokens = True

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        bos_token: str = AUTO,
        eos_token: str = AUTO,
        pad_token: str | None = AUTO,
    ) -> HFTokenizer:
        """Load a `tokenizer.json` file.

        Args:
            path: The file, or a directory holding `tokenizer.json`.
            bos_token: Text of the BOS token; `"auto"` as in the constructor.
            eos_token: Text of the EOS token; `"auto"` as in the constructor.
            pad_token: Text of the padding token, `None` to pad with the EOS id, or `"auto"`.

        Returns:
            The tokenizer.

        Raises:
            UserError: When the file is missing or lacks a special token.
        """
        return cls(str(path), bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        *,
        min_frequency: int = 2,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
    ) -> HFTokenizer:
        """Train a byte-level BPE on texts in memory (a few seconds for a few megabytes).

        The special tokens take ids 0, 1 and 2, then come the 256 bytes, then the merges.

        Args:
            texts: The training corpus, e.g. one string per line or per document.
            vocab_size: Vocabulary size, special tokens included; at least 259.
            min_frequency: Fewest occurrences of a pair for it to be merged.
            bos_token: Text of the BOS token.
            eos_token: Text of the EOS token.
            pad_token: Text of the padding token.

        Returns:
            The trained tokenizer.

        Raises:
            UserError: When `vocab_size` is below 259 or `min_frequency` is negative.
        """
        _check_training_args(vocab_size, min_frequency)
        specials = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        hf, trainer = _untrained_bpe(vocab_size, min_frequency, specials)
        hf.train_from_iterator(texts, trainer=trainer)
        tokenizer = cls.__new__(cls)
        tokenizer._init(hf, source="training", **specials)
        return tokenizer

    def encode(self, text: str) -> list[int]:
        """Encode text, adding no special tokens.

        Args:
            text: The text to encode.

        Returns:
            The token ids.
        """
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids, skipping special and out-of-range ids.

        Args:
            ids: Token ids, possibly generated by a model.

        Returns:
            The text; byte sequences that are not valid UTF-8 become U+FFFD.
        """
        # Negative ids would not even convert to the library's unsigned ids.
        valid = [i for i in _as_ints(ids) if 0 <= i < self._size]
        return self._hf.decode(valid, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added and special tokens included."""
        return self._size

    @property
    def bos_id(self) -> int:
        """Id of `bos_token`."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """Id of `eos_token`."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """Id of `pad_token`, or the EOS id when there is none."""
        return self._pad

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for what this class does not expose."""
        return self._hf

    def fingerprint(self) -> str:
        """A sha256 hex digest of the full `tokenizer.json` definition and the special ids.

        Returns:
            64 hex characters.
        """
        definition = json.loads(self._hf.to_str())
        return _sha256({"definition": definition, "special": [self._bos, self._eos, self._pad]})

    def _save_files(self, directory: Path) -> dict[str, Any]:
        self._hf.save(str(directory / "tokenizer.json"))
        return {"path": "tokenizer.json", **self._tokens}

    @classmethod
    def _from_saved(cls, directory: Path, init_args: dict[str, Any]) -> Tokenizer:
        init_args = dict(init_args)
        init_args["path"] = str(directory / init_args.get("path", "tokenizer.json"))
        return cls(**init_args)

    @staticmethod
    def _training_key(
        files: list[Path], vocab_size: int, min_frequency: int, specials: dict[str, Any]
    ) -> str:
        digest = hashlib.sha256()
        settings = {"vocab_size": vocab_size, "min_frequency": min_frequency, **specials}
        digest.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
        for f in files:
            digest.update(hashlib.sha256(f.read_bytes()).digest())
        return digest.hexdigest()


def _import_tokenizers() -> Any:
    try:
        return importlib.import_module("tokenizers")
    except ImportError as err:
        raise UserError(
            "HFTokenizer needs the `tokenizers` package: pip install tokenizers"
        ) from err


def _tokenizer_file(path: str | Path) -> Path:
    file = Path(path)
    return file / "tokenizer.json" if file.is_dir() else file


def _read_tokenizer_file(path: str | Path) -> tokenizers.Tokenizer:
    file = _tokenizer_file(path)
    if not file.is_file():
        raise UserError(f"tokenizer file not found: {str(file)!r}")
    tk = _import_tokenizers()
    try:
        return tk.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception on malformed files
        raise UserError(f"cannot read tokenizer file {str(file)!r}: {err}") from err


def _read_key(directory: Path) -> str | None:
    try:
        return json.loads((directory / "training.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_training_args(vocab_size: int, min_frequency: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 259:
        raise UserError(
            f"vocab_size must be an integer of at least 259 (256 bytes and 3 special tokens), "
            f"got {vocab_size!r}"
        )
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 0:
        raise UserError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")


def _untrained_bpe(
    vocab_size: int, min_frequency: int, specials: dict[str, Any]
) -> tuple[tokenizers.Tokenizer, Any]:
    tk = _import_tokenizers()
    # No prefix space and the matching decoder, so that decode(encode(s)) == s exactly.
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[t for t in specials.values() if t is not None],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return hf, trainer
