"""Tokenizer base class and its adapters: round trips, special ids, save/load, errors."""

from __future__ import annotations

import json
import pickle
import pydoc_data.topics
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.core.errors import UserError
from m3.data.tokenizer import MANIFEST, REFERENCE_TEXT, ByteTokenizer, HFTokenizer, Tokenizer

# About 200 KB of English prose and Python snippets shipped with every Python installation.
CORPUS = "\n".join(pydoc_data.topics.topics.values())[:200_000]
ALPHABET = sorted(set(CORPUS))


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return HFTokenizer.train(CORPUS.splitlines(keepends=True), vocab_size=512)


@pytest.fixture(scope="module")
def small_corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(CORPUS[:50_000], encoding="utf-8")
    return path


class AsciiTokenizer(Tokenizer):
    """The ten-line adapter the base class promises: characters 0-127, then specials."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text if ord(c) < 128]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids if 0 <= i < 128)

    vocab_size = property(lambda self: 131)
    bos_id = property(lambda self: 128)
    eos_id = property(lambda self: 129)
    pad_id = property(lambda self: 130)


# --- the base class -----------------------------------------------------------------------


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError):
        Tokenizer()  # type: ignore[abstract]


def test_adapters_are_found_as_subclasses() -> None:
    subclasses = Tokenizer.__subclasses__()
    assert ByteTokenizer in subclasses
    assert HFTokenizer in subclasses


def test_minimal_adapter_gets_prefix_and_fingerprint() -> None:
    tok = AsciiTokenizer()
    assert tok.reference_prefix() == [128, *[ord(c) for c in "Reference:"]]
    digest = tok.fingerprint()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == AsciiTokenizer().fingerprint()
    assert digest != ByteTokenizer().fingerprint()


def test_minimal_adapter_cannot_save_silently(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="AsciiTokenizer"):
        AsciiTokenizer().save(tmp_path)


# --- ByteTokenizer ------------------------------------------------------------------------


def test_byte_special_ids() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)


@given(st.text())
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


@given(st.lists(st.integers(min_value=-(2**40), max_value=2**40)))
def test_byte_decode_never_raises(ids: list[int]) -> None:
    text = ByteTokenizer().decode(ids)
    assert isinstance(text, str)
    assert len(text) <= sum(0 <= i < 256 for i in ids)


def test_byte_decode_skips_specials_and_replaces_bad_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.decode([256, 104, 105, 257, 258]) == "hi"
    assert tok.decode([0xC3]) == "\ufffd"


def test_byte_encode_rejects_lone_surrogate() -> None:
    with pytest.raises(UserError, match="position 1"):
        ByteTokenizer().encode("a\ud800b")


def test_byte_encode_keeps_special_strings_as_text() -> None:
    tok = ByteTokenizer()
    assert tok.encode("<s>") == [60, 115, 62]


# --- reference prefix ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_reference_prefix(name: str, bpe: HFTokenizer) -> None:
    tok = ByteTokenizer() if name == "bytes" else bpe
    prefix = tok.reference_prefix()
    assert prefix[0] == tok.bos_id
    assert prefix == [tok.bos_id, *tok.encode(REFERENCE_TEXT)]
    assert tok.bos_id not in prefix[1:]
    assert tok.decode(prefix) == "Reference:"


# --- HFTokenizer: a byte-level BPE trained here -------------------------------------------


def test_bpe_vocabulary(bpe: HFTokenizer) -> None:
    assert bpe.vocab_size == 512
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.backend.id_to_token(bpe.bos_id) == "<s>"


def test_bpe_compresses_its_corpus(bpe: HFTokenizer) -> None:
    sample = CORPUS[:20_000]
    # A real BPE with 253 merges beats one token per byte by a wide margin on its corpus.
    assert len(bpe.encode(sample)) < 0.6 * len(sample.encode("utf-8"))


@settings(deadline=None)
@given(st.text(alphabet=ALPHABET))
def test_bpe_round_trip_on_corpus_alphabet(bpe: HFTokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@settings(deadline=None)
@given(st.text())
def test_bpe_round_trip_on_any_text(bpe: HFTokenizer, text: str) -> None:
    # Byte-level: characters never seen in training still round-trip through their bytes.
    assert bpe.decode(bpe.encode(text)) == text


@settings(deadline=None)
@given(st.lists(st.integers(min_value=-(2**40), max_value=2**40)))
def test_bpe_decode_never_raises(bpe: HFTokenizer, ids: list[int]) -> None:
    assert isinstance(bpe.decode(ids), str)


def test_bpe_special_strings_in_text_are_text(bpe: HFTokenizer) -> None:
    text = "a <s> b </s> c <pad>"
    ids = bpe.encode(text)
    assert not {bpe.bos_id, bpe.eos_id, bpe.pad_id} & set(ids)
    assert bpe.decode(ids) == text


def test_bpe_decode_skips_specials(bpe: HFTokenizer) -> None:
    ids = bpe.encode("hello")
    assert bpe.decode([bpe.bos_id, *ids, bpe.eos_id, bpe.pad_id]) == "hello"


def test_bpe_pickles_with_special_strings_still_text(bpe: HFTokenizer) -> None:
    # DataLoader workers receive tokenizers by pickling.
    copy = pickle.loads(pickle.dumps(bpe))
    assert copy.encode("x <s> y") == bpe.encode("x <s> y")
    assert copy.bos_id not in copy.encode("<s>")
    assert copy.fingerprint() == bpe.fingerprint()


def test_bpe_train_rejects_small_vocab() -> None:
    with pytest.raises(UserError, match="vocab_size"):
        HFTokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(UserError, match="min_frequency"):
        HFTokenizer.train(["abc"], vocab_size=300, min_frequency=-1)


# --- fingerprints -------------------------------------------------------------------------


def test_fingerprints_tell_tokenizers_apart(bpe: HFTokenizer) -> None:
    other = HFTokenizer.train(CORPUS[:20_000].splitlines(keepends=True), vocab_size=300)
    prints = {ByteTokenizer().fingerprint(), bpe.fingerprint(), other.fingerprint()}
    assert len(prints) == 3
    assert bpe.fingerprint() == bpe.fingerprint()
    assert ByteTokenizer().fingerprint() == ByteTokenizer().fingerprint()


# --- save and load ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_save_load_round_trip(name: str, bpe: HFTokenizer, tmp_path: Path) -> None:
    tok = ByteTokenizer() if name == "bytes" else bpe
    assert tok.save(tmp_path / "tok") == tmp_path / "tok"
    loaded = Tokenizer.load(tmp_path / "tok")
    assert type(loaded) is type(tok)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(CORPUS[:2000]) == tok.encode(CORPUS[:2000])
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_saved_bpe_is_a_plain_tokenizer_json(bpe: HFTokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    for path in (tmp_path / "tokenizer.json", tmp_path):
        assert HFTokenizer(str(path)).fingerprint() == bpe.fingerprint()
        assert HFTokenizer.from_file(path).fingerprint() == bpe.fingerprint()


def test_load_checks_the_class(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path)
    with pytest.raises(UserError, match="ByteTokenizer"):
        HFTokenizer.load(tmp_path)
    assert isinstance(ByteTokenizer.load(tmp_path), ByteTokenizer)


def test_load_detects_a_changed_file(bpe: HFTokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    other = HFTokenizer.train(CORPUS[:20_000].splitlines(keepends=True), vocab_size=300)
    other.backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="changed"):
        Tokenizer.load(tmp_path)


def test_load_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=MANIFEST):
        Tokenizer.load(tmp_path)


def test_load_rejects_unknown_class(tmp_path: Path) -> None:
    manifest = {"class_path": "m3.nowhere.Nothing", "init_args": {}, "fingerprint": "0"}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"m3\.nowhere\.Nothing"):
        Tokenizer.load(tmp_path)


# --- HFTokenizer construction -------------------------------------------------------------


def test_missing_tokenizer_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(UserError, match="tokenizer file not found") as info:
        HFTokenizer(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(UserError) as info:
        HFTokenizer.from_file(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_malformed_tokenizer_file(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read") as info:
        HFTokenizer(str(path))
    assert str(path) in str(info.value)


def test_constructor_needs_exactly_one_source(small_corpus_file: Path) -> None:
    with pytest.raises(UserError, match="exactly one"):
        HFTokenizer()
    with pytest.raises(UserError, match="exactly one"):
        HFTokenizer("tokenizer.json", train_files=[str(small_corpus_file)])
    with pytest.raises(UserError, match="cache"):
        HFTokenizer("tokenizer.json", cache="somewhere")
    with pytest.raises(UserError, match="empty"):
        HFTokenizer(train_files=[])


def test_missing_training_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError) as info:
        HFTokenizer(train_files=[str(missing)], vocab_size=300)
    assert str(missing) in str(info.value)


def test_special_token_names(bpe: HFTokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    file = str(tmp_path / "tokenizer.json")
    no_pad = HFTokenizer(file, pad_token=None)
    assert no_pad.pad_id == no_pad.eos_id == bpe.eos_id
    with pytest.raises(UserError, match=re.escape("<|begin_of_text|>")):
        HFTokenizer(file, bos_token="<|begin_of_text|>")


def test_train_files_with_cache(
    small_corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import m3.data.tokenizer as module

    trainings = []
    untrained_bpe = module._untrained_bpe

    def counting(*args: object) -> object:
        trainings.append(args)
        return untrained_bpe(*args)

    monkeypatch.setattr(module, "_untrained_bpe", counting)
    cache = tmp_path / "bpe"
    args = dict(train_files=[str(small_corpus_file)], vocab_size=300, cache=str(cache))

    first = HFTokenizer(**args)
    assert len(trainings) == 1
    assert first.vocab_size == 300
    assert (cache / "tokenizer.json").is_file()
    assert Tokenizer.load(cache).fingerprint() == first.fingerprint()

    again = HFTokenizer(**args)
    assert len(trainings) == 1, "an unchanged corpus must be read from the cache"
    assert again.fingerprint() == first.fingerprint()

    HFTokenizer(**{**args, "vocab_size": 320})
    assert len(trainings) == 2, "other settings must retrain"

    changed = tmp_path / "changed.txt"
    changed.write_text(CORPUS[50_000:80_000], encoding="utf-8")
    retrained = HFTokenizer(**{**args, "train_files": [str(changed)]})
    assert len(trainings) == 3, "another corpus must retrain"
    assert retrained.fingerprint() != first.fingerprint()
