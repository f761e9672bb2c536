"""Which BOS, EOS and pad tokens a checkpoint's tokenizer was trained with.

A Hugging Face checkpoint ships its `tokenizer.json` with a `tokenizer_config.json` and often
a `special_tokens_map.json`; these name the special tokens (`bos_token`, `eos_token`,
`pad_token`), as strings or as AddedToken objects `{"content": "<s>", ...}`, and `null`
where the model has none. `HFTokenizer` reads them through `resolve_special_tokens` when its
token arguments are left at `"auto"`:

```python
from m3.data.tokenizer import HFTokenizer

HFTokenizer("checkpoints/llama-3.2-1b")                       # <|begin_of_text|>, <|end_of_text|>
HFTokenizer("checkpoints/qwen2.5-0.5b", bos_token="<|endoftext|>")  # Qwen has no BOS
```

For each token, `tokenizer_config.json` decides when it has the field, else
`special_tokens_map.json` (the older file; transformers reads it only for checkpoints
whose `tokenizer_config.json` lacks the field too). Where neither file names a token, m3's own
names apply: `<s>`, `</s>`, and `<pad>` when the vocabulary has it (else the EOS id pads).

Whether a tokenizer adds a BOS itself (`add_bos_token`, or a post-processor in
`tokenizer.json` such as Llama 3's) does not matter: m3 encodes with no special tokens
added and puts the BOS in front itself, once.

A tokenizer trained without a BOS (Qwen2.5, Qwen3: `"bos_token": null`) is refused unless a
token is chosen to stand for one: m3 starts every context and every reference's prefix
`<s>Reference:` with a BOS (paper §3.3), and which token takes that place changes every
memory the model writes, so it is the recipe's choice, not a guess. The message suggests
`<|endoftext|>`, the token Qwen's pretraining puts between documents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m3.core.errors import UserError

#: The value of a token argument that reads the token from the checkpoint's files.
AUTO = "auto"

#: Token names, and what m3 calls each token when no file names one.
DEFAULTS: dict[str, str] = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

#: Files that name the special tokens, the first that has a field deciding it.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")

#: Suggested stand-in for a missing BOS, when the vocabulary has it (Qwen's separator).
SEPARATOR = "<|endoftext|>"

_MISSING = object()


def named_tokens(directory: Path) -> dict[str, tuple[str | None, Path]]:
    """The special tokens a checkpoint's files name, and which file names each.

    Args:
        directory: The folder holding `tokenizer.json`.

    Returns:
        Token name (`bos_token`, `eos_token`, `pad_token`) -> (its text, or None where the
        file sets it to null; the file). Names no file has are left out.

    Raises:
        UserError: For a file that is not a JSON object, or a field that is neither a
            string, null nor an object with a string `content`, naming the file and field.
    """
    found: dict[str, tuple[str | None, Path]] = {}
    for name in CONFIG_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UserError(f"cannot read {str(file)!r}: {err}") from err
        if not isinstance(data, dict):
            raise UserError(f"{str(file)!r} is not a JSON object")
        for field in DEFAULTS:
            value = data.get(field, _MISSING)
            if field not in found and value is not _MISSING:
                found[field] = (_token_text(value, file, field), file)
    return found


def _token_text(value: Any, file: Path, field: str) -> str | None:
    if isinstance(value, dict):  # an AddedToken: {"__type": "AddedToken", "content": ...}
        value = value.get("content")
        if value is None:
            raise UserError(f"{str(file)!r}: {field} is an object without a 'content' string")
    if value is None or isinstance(value, str):
        return value
    raise UserError(
        f"{str(file)!r}: {field} must be a string, null or an object with 'content', got {value!r}"
    )


def resolve_special_tokens(
    requested: dict[str, str | None],
    *,
    directory: Path | None,
    token_to_id: Callable[[str], int | None],
    source: str,
) -> dict[str, str | None]:
    """The BOS, EOS and pad token texts to use, `"auto"` ones read from the checkpoint.

    Args:
        requested: `bos_token`, `eos_token`, `pad_token` as given: a token's text, `"auto"`,
            or (pad only) None for padding with the EOS id.
        directory: The folder to read `tokenizer_config.json` and `special_tokens_map.json`
            from, or None for a tokenizer that has none (one m3 trained).
        token_to_id: The tokenizer's lookup, to check that a token exists.
        source: The tokenizer file, for messages.

    Returns:
        The three names mapped to token texts; `pad_token` may be None (the EOS id pads).
        Explicit texts are returned unchanged (the caller checks they exist).

    Raises:
        UserError: When a file sets `bos_token` or `eos_token` to null (the model has no such
            token) and none is given, or names a token the vocabulary lacks, naming the
            file, the field and the argument that settles it.
    """
    named = named_tokens(directory) if directory is not None else {}
    resolved: dict[str, str | None] = {}
    for field, value in requested.items():
        if value != AUTO:
            resolved[field] = value
            continue
        if field not in named:  # no file says: m3's own names
            default = DEFAULTS[field]
            missing_pad = field == "pad_token" and token_to_id(default) is None
            resolved[field] = None if missing_pad else default
            continue
        token, file = named[field]
        if token is None and field == "pad_token":
            resolved[field] = None
            continue
        if token is None:
            raise UserError(_no_token_message(field, file, named, token_to_id))
        if token_to_id(token) is None:
            raise UserError(
                f"{str(file)!r}: {field} is {token!r}, which tokenizer {source!r} does not "
                f"have; pass {field}= with one of its tokens (in a recipe, "
                f"tokenizer.init_args.{field})"
            )
        resolved[field] = token
    return resolved


def _no_token_message(
    field: str,
    file: Path,
    named: dict[str, tuple[str | None, Path]],
    token_to_id: Callable[[str], Any],
) -> str:
    if field == "bos_token":
        need = (
            "this tokenizer has no BOS, and m3 starts every context and the prefix "
            "<s>Reference: of every reference with one (paper §3.3)"
        )
    else:
        need = "this tokenizer has no EOS, and m3 ends every training document with one"
    candidates = [SEPARATOR, named.get("eos_token", (None,))[0]]
    suggestion = next((t for t in candidates if t and token_to_id(t) is not None), None)
    example = f", e.g. {suggestion!r}" if suggestion else ""
    return (
        f"{str(file)!r}: {field} is null: {need}; choose the token that takes its place with "
        f"{field}= (in a recipe, tokenizer.init_args.{field}){example}"
    )
