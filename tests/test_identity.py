"""Components are recorded by kind and name, so moving a file leaves banks and manifests valid.

Fingerprints and manifests name a built-in class `kind:name` (e.g. `embedder:hashed_ngram`)
and a user's own class by its dotted path; what m3 0.1 recorded (module paths of its flat
layout) still resolves, without a deprecation warning, and its fingerprints still match.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from m3.core import registry
from m3.core.errors import UserError
from m3.data.tokenizer import ByteTokenizer, Tokenizer
from m3.retrieval.embedders import Embedder, HashedNgramEmbedder

ROOT = Path(__file__).resolve().parents[1]


def builtins() -> list[tuple[str, str, type]]:
    return [
        (kind, name, cls)
        for kind in registry.KINDS
        for name, cls in registry.available(kind).items()
        if registry.is_builtin(cls) and "." not in name
    ]


@pytest.mark.parametrize(
    ("kind", "name", "cls"), builtins(), ids=lambda v: getattr(v, "__name__", v)
)
def test_every_builtin_is_recorded_by_kind_and_name_and_read_back(kind, name, cls):
    assert registry.identity(cls) == f"{kind}:{name}"
    assert registry.class_of(f"{kind}:{name}") is cls
    assert registry.class_of(f"{kind}:{name}", kind) is cls


class PlainEmbedder(HashedNgramEmbedder):
    """A user's own embedder: not one of m3's."""


def test_a_users_class_is_recorded_by_its_dotted_path():
    assert registry.identity(PlainEmbedder) == f"{__name__}.PlainEmbedder"
    assert registry.class_of(f"{__name__}.PlainEmbedder", "embedder") is PlainEmbedder
    assert PlainEmbedder().fingerprint() != HashedNgramEmbedder().fingerprint()


@pytest.mark.parametrize(
    ("old", "cls"),
    [
        ("m3.embedders.HashedNgramEmbedder", HashedNgramEmbedder),
        ("m3.tokenizer.ByteTokenizer", ByteTokenizer),
        ("m3.backends.exact_index.ExactIndex", None),
    ],
)
def test_what_m3_0_1_recorded_still_resolves_without_a_warning(old, cls):
    if cls is None:
        from m3.backends.exact_index import ExactIndex as cls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.class_of(old) is cls
    assert registry.legacy_class_path(cls) == old


def test_class_of_refuses_the_wrong_kind_and_unknown_names():
    with pytest.raises(UserError, match="names a embedder, expected a index"):
        registry.class_of("embedder:hashed_ngram", "index")
    with pytest.raises(UserError, match="unknown embedder"):
        registry.class_of("embedder:no_such_thing")
    with pytest.raises(UserError, match="is not a index"):
        registry.class_of("m3.embedders.HashedNgramEmbedder", "index")


def _digest(name: str, embedder: Embedder) -> str:
    # the fingerprint as m3 0.1 wrote it: a digest of the class's module path and settings
    state = {"class": name, **embedder.settings()}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def test_embedder_fingerprints_name_the_kind_and_accept_m3_0_1s():
    embedder = HashedNgramEmbedder(dim=64)
    assert embedder.fingerprint() == _digest("embedder:hashed_ngram", embedder)
    assert embedder.matches(embedder.fingerprint())
    assert embedder.matches(_digest("m3.embedders.HashedNgramEmbedder", embedder))
    assert not embedder.matches(_digest("m3.embedders.HashedNgramEmbedder", HashedNgramEmbedder()))
    assert not embedder.matches(_digest("some.other.Embedder", embedder))


def test_a_saved_tokenizer_records_its_identity_and_m3_0_1_manifests_still_load(tmp_path):
    from m3.data.tokenizer import MANIFEST, HFTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    tokenizer = HFTokenizer(train_files=[str(corpus)], vocab_size=300, cache=str(tmp_path / "c"))
    saved = tokenizer.save(tmp_path / "saved")
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["class_path"] == "tokenizer:hf"
    assert Tokenizer.load(saved).fingerprint() == tokenizer.fingerprint()
    manifest["class_path"] = "m3.tokenizer.HFTokenizer"  # as m3 0.1 wrote it
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tokenizer.load(saved).fingerprint() == tokenizer.fingerprint()


def test_components_lists_every_builtin_whatever_was_imported_before():
    # a fresh process that imported nothing but the CLI
    listing = subprocess.run(
        [sys.executable, "-m", "m3", "components"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    # every built-in, those in modules the kind's base module does not import included
    for kind, name, _ in builtins():
        assert f"\n  {name} " in listing.split(f"{kind}: ", 1)[1], (kind, name)
    for name in ("sharded", "cold_start", "sentence"):
        assert f"\n  {name} " in listing, listing
