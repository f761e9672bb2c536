"""The lexical embedder: stable, normalised, and it retrieves by rare shared words."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from m3.embedders import HashedNgramEmbedder
from m3.errors import UserError

KB = [
    "Velmora Quist is a glassblower born in Tarnhollow in 1843.",
    "Orrin Dask founded the Brisk Company in 1790 in Omaren.",
    "Tarnhollow is a town on the river Sulvey, founded in 1201.",
    "The Brisk Company makes ropes and is based in Omaren.",
]


def test_vectors_are_unit_length_and_empty_text_is_zero():
    vectors = HashedNgramEmbedder(dim=256).embed([*KB, "", "!!!"])
    assert vectors.shape == (6, 256) and vectors.dtype == torch.float32
    assert torch.allclose(vectors[:4].norm(dim=1), torch.ones(4))
    assert not vectors[4:].any()


def test_vectors_are_the_same_in_another_process():
    """CRC-32, not Python's salted hash(): an index built in one process serves another."""
    here = HashedNgramEmbedder(dim=64).embed(KB[:1])[0]
    code = (
        "from m3.embedders import HashedNgramEmbedder;"
        f"print(HashedNgramEmbedder(dim=64).embed([{KB[0]!r}])[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})  # fmt: skip
    assert torch.allclose(here, torch.tensor(eval(out.stdout)))


@pytest.mark.parametrize("fitted", [False, True])
def test_a_question_retrieves_the_reference_with_its_entity(fitted):
    embedder = HashedNgramEmbedder(dim=4096)
    if fitted:
        embedder.fit(KB)
    keys = embedder.embed(KB)
    queries = embedder.embed(["Where was Velmora Quist born?", "Who founded the Brisk Company?"])
    assert (queries @ keys.T).argmax(dim=1).tolist() == [0, 1]


def test_idf_downweights_common_words():
    embedder = HashedNgramEmbedder(dim=4096, ngrams=(1,))
    plain = embedder.embed(["the town of Tarnhollow"])
    embedder.fit(KB * 3 + ["the the the"] * 10)
    weighted = embedder.embed(["the town of Tarnhollow"])
    the = embedder.embed(["the"])[0].abs().argmax()
    name = embedder.embed(["tarnhollow"])[0].abs().argmax()
    assert (
        weighted[0, the].abs() / weighted[0, name].abs()
        < plain[0, the].abs() / plain[0, name].abs()
    )


def test_save_load_round_trip_and_fingerprint(tmp_path):
    embedder = HashedNgramEmbedder(dim=128, ngrams=(1, 2, 3))
    before = embedder.fingerprint()
    embedder.fit(KB)
    assert embedder.fingerprint() != before
    embedder.save(tmp_path / "emb")
    loaded = HashedNgramEmbedder.load(tmp_path / "emb")
    assert loaded.fingerprint() == embedder.fingerprint()
    assert torch.equal(loaded.embed(KB), embedder.embed(KB))


def test_bad_arguments_are_refused():
    with pytest.raises(UserError, match="dim must be"):
        HashedNgramEmbedder(dim=0)
    with pytest.raises(UserError, match="ngrams"):
        HashedNgramEmbedder(ngrams=())
    with pytest.raises(UserError, match="empty corpus"):
        HashedNgramEmbedder().fit([])
    with pytest.raises(UserError, match="no embedder"):
        HashedNgramEmbedder.load("/nonexistent/embedder")
