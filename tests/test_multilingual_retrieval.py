"""The default embedder retrieves in scripts without spaces and emoji; old banks embed as before.

The paper's model is bilingual (Memory³, arXiv:2407.01178: its pretraining data is English and
Chinese, §4, and §7 evaluates it on C-Eval and CMMLU), and references are retrieved by the
similarity of their embeddings to a chunk's (§3.1–§3.2). `HashedNgramEmbedder` used to cut
text into `\\w+` runs, so that a Chinese or Japanese sentence was one word and emoji were no
word at all. Here:

- generated knowledge bases of random facts (names, places, things, numbers) in Chinese,
  Japanese, Arabic, emoji and English, queried by a paraphrase of one fact: the right
  reference is in the top 5 at least as often as in English, with the `"unicode"`
  segmentation (the default);
- the `"words"` segmentation, and so every bank built before it existed, embeds exactly as
  the old code did: checked against a slow re-implementation and against the vectors of the
  bank in `tests/fixtures/pre_house/`;
- properties of the segmentation (hypothesis);
- through the real `Retriever`, a query that matches nothing retrieves nothing.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3.backends.base import StoreInfo
from m3.backends.exact_index import ExactIndex
from m3.backends.in_memory import InMemoryStore
from m3.bank.open import open_bank
from m3.core.errors import UserError
from m3.data.chunking import Reference
from m3.data.tokenizer import ByteTokenizer
from m3.memory.encoder import encode_references
from m3.model.config import Config
from m3.model.memory3 import Memory3
from m3.retrieval.embedders import HashedNgramEmbedder
from m3.retrieval.retriever import Retriever
from m3.retrieval.segmentation import unicode_tokens

FIXTURE_BANK = Path(__file__).resolve().parent / "fixtures" / "pre_house" / "bank"
K = 5


# ------------------------------------------------------------------ generated knowledge bases
@dataclass(frozen=True)
class Script:
    """Vocabularies of one script and how a fact and a question about it are written."""

    given: Sequence[str]
    family: Sequence[str]
    places: Sequence[str]
    things: Sequence[str]
    fact: Callable[[str, str, str, str, int], str]  # given, family, place, thing, number
    by_name: Callable[[str, str, str], str]  # a question: given, family, thing
    by_family: Callable[[str, str, str], str]  # another: family, place, thing


def _arabic_digits(n: int) -> str:
    return str(n).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))


def _keycaps(n: int) -> str:
    return "".join(f"{d}\ufe0f\u20e3" for d in str(n))


def _words(text: str) -> list[str]:
    return text.split()


SCRIPTS = {
    "english": Script(
        given=_words(
            "Arlen Berin Calder Dorian Elsa Faron Greta Halden Ilse Joran Kestrel Liora Maren "
            "Nolan Orla Perrin Quilla Rowan Sabine Torin"
        ),
        family=_words(
            "Ashdown Brightwater Coldridge Dunmore Elwood Fairhaven Greystone Hollis Ironside "
            "Jessup Kingsley Lockhart Merriweather Northcott Oakhurst Pemberton Quarry "
            "Ravenscroft Stanfield Thornbury"
        ),
        places=_words(
            "Ambleford Brackwater Corrin Dunhallow Eastmere Fenwick Galloway Harrowgate Istead "
            "Kelmscott Larkhill Millbrook"
        ),
        things=_words("cats boats lamps books clocks goats drums kites maps bells"),
        fact=lambda g, f, p, t, n: f"{g} {f} lives in {p} and keeps {n} {t} at home.",
        by_name=lambda g, f, t: f"How many {t} does {g} {f} keep?",
        by_family=lambda f, p, t: f"Which of the {f} family in {p} has {t}?",
    ),
    "chinese": Script(
        given=_words(
            "伟芳 娜敏 静丽 强磊 军洋 勇艳 杰娟 涛明 超秀 霞平 刚桂 英华 玉兰 志明 春生 海燕 "
            "建国 晓东 文博 思雨"
        ),
        family=list("王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗"),
        places=_words("北京 上海 广州 深圳 成都 杭州 南京 武汉 西安 重庆 苏州 天津"),
        things=_words("猫 狗 船 灯 书 钟 羊 鼓 风筝 地图"),
        fact=lambda g, f, p, t, n: f"{f}{g}住在{p}，家里养着{n}个{t}。",
        by_name=lambda g, f, t: f"{f}{g}家里有几个{t}？",
        by_family=lambda f, p, t: f"在{p}有{t}的那位姓{f}的人是谁？",
    ),
    "japanese": Script(
        given=_words(
            "さくら ひろし ゆうき あおい はると めぐみ たくや なおみ けんた まゆ しょう りな "
            "ゆい だいき あやか こうた みく そうた えり かいと"
        ),
        family=_words(
            "田中 佐藤 鈴木 高橋 伊藤 渡辺 山本 中村 小林 加藤 吉田 山田 佐々木 山口 松本 "
            "井上 木村 林 清水 斎藤"
        ),
        places=_words("東京 大阪 京都 札幌 福岡 名古屋 横浜 神戸 仙台 広島 奈良 金沢"),
        things=_words("カメラ ギター ボール ノート ランプ コップ ペン バッグ ピアノ ドラム"),
        fact=lambda g, f, p, t, n: f"{f}{g}さんは{p}に住んでいて、{t}を{n}個持っています。",
        by_name=lambda g, f, t: f"{f}{g}さんは{t}をいくつ持っていますか？",
        by_family=lambda f, p, t: f"{p}で{t}を持っている{f}さんは誰ですか？",
    ),
    "arabic": Script(
        given=_words(
            "محمد أحمد علي عمر خالد يوسف سارة فاطمة مريم ليلى حسن نور زينب كريم سلمى طارق "
            "هدى رامي دينا ياسر"
        ),
        family=_words(
            "الخطيب النجار الحداد العلي السيد الشامي المصري البغدادي الحلبي القاسم الزين "
            "الرفاعي العطار الخوري الصباغ الحسيني التميمي الهاشمي الدباغ الفارس"
        ),
        places=_words("القاهرة دمشق بغداد عمان بيروت الرياض تونس الرباط الدوحة مسقط صنعاء الجزائر"),
        things=_words("قطط قوارب مصابيح كتب ساعات ماعز طبول طائرات خرائط أجراس"),
        fact=lambda g, f, p, t, n: f"يعيش {g} {f} في {p} ولديه {_arabic_digits(n)} {t} في بيته.",
        by_name=lambda g, f, t: f"كم {t} لدى {g} {f}؟",
        by_family=lambda f, p, t: f"من من عائلة {f} يملك {t} في {p}؟",
    ),
    "emoji": Script(  # with ZWJ sequences, variation selectors, a skin tone and flags
        given=_words(
            "👩\u200d🚀 🧑\u200d🍳 👨\u200d🌾 👩\u200d🎨 🧙 🧛 🧜\u200d♀\ufe0f 🦸 🤴 👸 "
            "🧑\u200d🔬 👮 🕵\ufe0f 💂 👷 🧑\u200d🏫 👩\u200d⚕\ufe0f 🧑\u200d✈\ufe0f 🥷 🧝🏽"
        ),
        family=_words("🐶 🐱 🦊 🐻 🐼 🐨 🐯 🦁 🐮 🐷 🐸 🐵 🦉 🐧 🐢 🐙 🦋 🐝 🦄 🐲"),
        places=_words("🇯🇵 🇫🇷 🇧🇷 🇨🇳 🇮🇹 🇪🇸 🇰🇷 🇲🇽 🇨🇦 🇩🇪 🇮🇳 🇪🇬"),
        things=_words("🍕 🚲 📚 ⏰ 🎸 🎈 🗺\ufe0f 🔔 🥁 🪁"),
        fact=lambda g, f, p, t, n: f"{g}{f} 🏠 {p} ❤\ufe0f {t} {_keycaps(n)}",
        by_name=lambda g, f, t: f"❓ {g}{f} {t}",
        by_family=lambda f, p, t: f"🔍 {f} {p} {t}",
    ),
}
SIZE = 300  # references per knowledge base: 300 of the 400 names


@cache
def knowledge_base(script: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """`SIZE` facts about distinct people, and a question about each (same order).

    Every script draws the same choices (its vocabularies have the same sizes), so its
    facts are as ambiguous as the English ones, and every number is one token, as in
    English (digits: a number in Chinese numerals, 三十四, is 3 characters and 5 n-grams,
    which lowers the cosine of its fact, and recall to 0.99 against English's 0.996). Even
    questions name the person; odd ones only the family, place and thing, which a few people
    may share.
    """
    vocab, rng = SCRIPTS[script], random.Random(seed)
    names = rng.sample([(g, f) for g in vocab.given for f in vocab.family], SIZE)
    facts, questions = [], []
    for n, (g, f) in enumerate(names):
        place, thing = rng.choice(vocab.places), rng.choice(vocab.things)
        facts.append(vocab.fact(g, f, place, thing, rng.randint(2, 99)))
        questions.append(vocab.by_family(f, place, thing) if n % 2 else vocab.by_name(g, f, thing))
    return facts, questions


def recall_at_k(facts: list[str], questions: list[str], embedder: HashedNgramEmbedder) -> float:
    """How often question `i` finds fact `i` among its top `K`, as a bank's index would."""
    embedder.fit(facts)  # as `build_index` does
    index = ExactIndex(embedder.dim, metric="cosine")
    index.add(embedder.embed(facts), torch.arange(len(facts)))
    found = index.search(embedder.embed(questions), K).ids
    return (found == torch.arange(len(questions))[:, None]).any(dim=1).float().mean().item()


@cache
def recalls(segmentation: str) -> dict[str, float]:
    return {
        script: recall_at_k(*knowledge_base(script), HashedNgramEmbedder(segmentation=segmentation))
        for script in SCRIPTS
    }


def test_every_script_finds_the_right_reference_as_often_as_english() -> None:
    new = recalls("unicode")
    for script, recall in new.items():
        assert recall >= new["english"], (script, new)
        assert recall >= 0.95, (script, new)


def test_the_words_segmentation_fails_scripts_without_spaces_and_emoji() -> None:
    """What the issue reported: the old segmentation hardly ever finds the right fact."""
    old, new = recalls("words"), recalls("unicode")
    assert old["english"] == new["english"]  # on ASCII text both segment alike
    for script in ("chinese", "japanese", "emoji"):
        assert old[script] < 0.2 < new[script], (script, old)


def test_a_bilingual_bank_answers_each_language_from_its_own_facts() -> None:
    english, chinese = knowledge_base("english"), knowledge_base("chinese")
    facts, questions = english[0] + chinese[0], english[1] + chinese[1]
    assert recall_at_k(facts, questions, HashedNgramEmbedder()) >= 0.95


# ------------------------------------------------------------------ the old segmentation
def old_vectors(texts: Sequence[str], dim: int, ngrams: Sequence[int], idf: torch.Tensor | None):
    """A slow re-implementation of the embedding m3 did before `segmentation` existed."""
    out = torch.zeros(len(texts), dim, dtype=torch.float64)
    for row, text in enumerate(texts):
        words = re.findall(r"\w+", text.lower())
        grams = [" ".join(words[i : i + n]) for n in ngrams for i in range(len(words) - n + 1)]
        counts: dict[tuple[int, float], int] = {}
        for gram in grams:
            key = zlib.crc32(gram.encode())
            feature = (key % dim, 1.0 if key & 0x80000000 else -1.0)
            counts[feature] = counts.get(feature, 0) + 1
        for (bucket, sign), tf in counts.items():
            out[row, bucket] += sign * (1.0 + math.log(tf))
    if idf is not None:
        out *= idf.double()
    norms = out.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, out / norms.clamp(min=1e-12), out).float()


TEXTS = st.lists(st.text(max_size=40), min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(texts=TEXTS, ngrams=st.sampled_from([(1,), (1, 2), (1, 2, 3), (2,)]))
def test_the_words_segmentation_embeds_as_the_old_code(texts: list[str], ngrams) -> None:
    embedder = HashedNgramEmbedder(dim=97, ngrams=ngrams, segmentation="words")
    assert torch.allclose(embedder.embed(texts), old_vectors(texts, 97, ngrams, None), atol=1e-6)
    embedder.fit([*texts, "a b c"])
    expected = old_vectors(texts, 97, ngrams, embedder.idf)
    assert torch.allclose(embedder.embed(texts), expected, atol=1e-6)


def test_words_and_its_fingerprint_are_those_of_embedders_made_before() -> None:
    """The old settings had no segmentation: `"words"` adds nothing, `"unicode"` adds itself."""
    old = HashedNgramEmbedder(dim=64, segmentation="words")
    assert set(old.settings()) == {"dim", "ngrams", "lowercase", "idf"}
    new = HashedNgramEmbedder(dim=64)
    assert new.settings() == {**old.settings(), "segmentation": "unicode"}
    assert new.fingerprint() != old.fingerprint() and not new.matches(old.fingerprint())
    with pytest.raises(UserError, match="segmentation must be one of"):
        HashedNgramEmbedder(segmentation="characters")


def test_an_embedder_saved_without_a_segmentation_loads_with_words(tmp_path: Path) -> None:
    (tmp_path / "embedder.json").write_text(json.dumps({"dim": 64, "ngrams": [1, 2]}))
    assert HashedNgramEmbedder.load(tmp_path).segmentation == "words"
    HashedNgramEmbedder(dim=64).save(tmp_path / "new")
    assert HashedNgramEmbedder.load(tmp_path / "new").segmentation == "unicode"


def test_the_pre_house_bank_embeds_its_references_as_its_index_holds(tmp_path: Path) -> None:
    """The bank of `tests/fixtures/pre_house/`, built before: its vectors are reproduced."""
    shutil.copytree(FIXTURE_BANK, tmp_path / "bank")
    bank = open_bank(tmp_path / "bank")  # checks the saved embedder against the manifest
    try:
        assert isinstance(bank.embedder, HashedNgramEmbedder)
        assert bank.embedder.segmentation == "words"
        assert bank.embedder.matches(bank.manifest["embedder"]["fingerprint"])
        ids = np.load(FIXTURE_BANK / "index" / "ids.npy")
        stored = torch.from_numpy(np.load(FIXTURE_BANK / "index" / "vectors.npy"))
        tokenizer = ByteTokenizer()
        texts = [tokenizer.decode(r.ids) for r in bank.store.references(ids.tolist())]
        assert torch.allclose(bank.embedder.embed(texts), stored, atol=1e-6)
        # the same texts embed otherwise with the new default: it is not what built the bank
        unicode = HashedNgramEmbedder.load(tmp_path / "bank" / "embedder")
        unicode.segmentation = "unicode"
        assert not unicode.matches(bank.manifest["embedder"]["fingerprint"])
    finally:
        bank.store.close()


# ------------------------------------------------------------------ segmentation properties
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127)))
def test_on_ascii_text_unicode_segments_as_words(text: str) -> None:
    assert unicode_tokens(text) == re.findall(r"\w+", text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127)))
def test_on_ascii_text_the_pattern_itself_is_words(text: str) -> None:
    """The pattern, not only the shortcut `unicode_tokens` takes on ASCII pieces."""
    from m3.retrieval.segmentation import _unicode_tables

    assert _unicode_tables()[0].findall(text) == re.findall(r"\w+", text)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_the_shortcuts_agree_with_the_pattern(text: str) -> None:
    from m3.retrieval.segmentation import _unicode_tables

    pattern, dropped = _unicode_tables()
    normal = unicodedata.normalize("NFKC", text).translate(dropped)
    assert unicode_tokens(text) == pattern.findall(normal)
    assert unicode_tokens(text, lowercase=True) == pattern.findall(normal.lower())


@settings(max_examples=300, deadline=None)
@given(a=st.text(), b=st.text())
def test_segmenting_a_concatenation_concatenates_the_tokens(a: str, b: str) -> None:
    assert unicode_tokens(f"{a} {b}") == unicode_tokens(a) + unicode_tokens(b)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_tokens_are_non_empty_and_hold_no_white_space(text: str) -> None:
    tokens = HashedNgramEmbedder().tokens(text)
    assert all(tokens) and not any(any(c.isspace() for c in t) for t in tokens)
    assert unicode_tokens(" ".join(tokens)) == tokens  # segmenting again changes nothing


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)))
def test_each_han_character_is_a_token(text: str) -> None:
    assert unicode_tokens(text) == list(text)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("北京是中国的首都。", list("北京是中国的首都")),
        ("東京タワーは1958年に完成", [*"東京タワーは", "1958", *"年に完成"]),
        ("ｶﾀｶﾅとＡＢＣ１２３", [*"カタカナと", "ABC123"]),  # NFKC widens kana, narrows ASCII
        ("서울에서 만나요", [*"서울에서", *"만나요"]),
        ("ภาษาไทย", ["ภ", "า", "ษ", "า", "ไ", "ท", "ย"]),
        ("مَدِينَة القاهرة", ["مَدِينَة", "القاهرة"]),  # harakat stay inside their word
        ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),  # so do Devanagari vowel signs
        ("cafe\u0301 naïve", ["café", "naïve"]),
        ("I ❤️ 🍕🍕, 👍🏽!", ["I", "❤", "🍕", "🍕", "👍"]),  # selector and skin tone dropped
        ("👩\u200d🚀 🇯🇵", ["👩", "🚀", "🇯", "🇵"]),  # ZWJ sequences and flags: their parts
        ("€5 → ∑", ["€", "5", "→", "∑"]),
        ("co\u00adoperate", ["cooperate"]),  # soft hyphen (a format character) dropped
        ("snake_case x^2 3.14", ["snake_case", "x", "2", "3", "14"]),
    ],
)
def test_examples_of_the_unicode_segmentation(text: str, tokens: list[str]) -> None:
    assert unicode_tokens(text) == tokens


def test_the_embedder_lower_cases_after_normalising() -> None:
    embedder = HashedNgramEmbedder()
    assert embedder.tokens("ℌello ＡＢＣ Straße ΣΟΦΙΑ") == ["hello", "abc", "straße", "σοφια"]
    assert HashedNgramEmbedder(lowercase=False).tokens("ＡＢＣ Abc") == ["ABC", "Abc"]


def test_word_pairs_of_characters_are_character_bigrams() -> None:
    embedder = HashedNgramEmbedder(dim=4096)
    a, b, c = embedder.embed(["王志明住在北京", "王志明", "明志王"])  # same characters
    assert a @ b > a @ c > 0  # the order of the characters counts, through the bigrams


# ------------------------------------------------------------------ no match, no memory
CONFIG = Config(
    vocab_size=259, n_layer=2, n_head=2, n_kv_head=1, head_dim=8, n_embd=16, mlp_hidden=32,
    block_size=512, memory_layers=(0, 1), memory_tokens=4, chunk_length=64, reference_length=128,
    init_std=0.3,
)  # fmt: skip
TOKENIZER = ByteTokenizer()


@cache
def small_bank() -> tuple[Memory3, InMemoryStore, list[str]]:
    torch.manual_seed(0)
    model = Memory3(CONFIG).eval().requires_grad_(False)
    facts = knowledge_base("english")[0][:30]
    references = [TOKENIZER.encode(text) for text in facts]
    memory = encode_references(model, references, prefix=TOKENIZER.reference_prefix())
    store = InMemoryStore(
        StoreInfo(
            memory_shape=CONFIG.memory_shape,
            dtype="float32",
            model_fingerprint=model.memory_fingerprint(),
            tokenizer_fingerprint=TOKENIZER.fingerprint(),
            reference_prefix=tuple(TOKENIZER.reference_prefix()),
        )
    )
    rows = [Reference(f"doc{i}", 0, len(ids), tuple(ids)) for i, ids in enumerate(references)]
    store.write(torch.arange(len(facts)), memory, rows)
    return model, store, facts


def make_retriever(segmentation: str = "unicode", **changes) -> Retriever:
    model, store, facts = small_bank()
    embedder = HashedNgramEmbedder(dim=4096, segmentation=segmentation)
    embedder.fit(facts)
    index = ExactIndex(embedder.dim, metric="cosine")
    index.add(embedder.embed(facts), torch.arange(len(facts)))
    settings_ = dict(
        embedder=embedder, index=index, store=store, tokenizer=TOKENIZER, model=model, k=K,
        expected_embedder_fingerprint=embedder.fingerprint(),
    )  # fmt: skip
    return Retriever(**{**settings_, **changes})


@pytest.mark.parametrize("threshold", [None, 2 / 3])
def test_a_query_without_any_token_retrieves_nothing(threshold: float | None) -> None:
    retriever = make_retriever(threshold=threshold)
    question = knowledge_base("english")[1][3]
    found = retriever.retrieve([["?!… — ...", question]])
    assert (found.ids[0, 0] == -1).all() and (found.scores[0, 0] == -torch.inf).all()
    assert not found.memories.valid[0, :K].any()
    assert found.ids[0, 1, 0].item() == 3 and (found.ids[0, 1] >= 0).all()
    ids, _ = retriever.search(["!!!"])
    assert (ids == -1).all()
    step = retriever.retrieve_next([[TOKENIZER.bos_id, *TOKENIZER.encode("... ???")]])
    assert (step.ids == -1).all() and not step.memories.valid.any()


def test_an_emoji_query_on_a_bank_of_old_settings_retrieves_nothing() -> None:
    """With `"words"`, emoji are no token: such a query used to read 5 arbitrary references."""
    found = make_retriever("words").retrieve([["🍕 ❓ 🚲"]])
    assert (found.ids == -1).all()
    assert (make_retriever().retrieve([["🍕 ❓ 🚲"]]).ids >= 0).all()  # unicode: it has tokens


def test_min_score_drops_references_that_share_nothing_and_does_not_search_wider() -> None:
    question = "北京是中国的首都"  # no token in common with the English facts
    plain, strict = make_retriever(), make_retriever(min_score=0.0)
    vectors = plain.embedder.embed([question, *small_bank()[2]])
    # it shares no token: all score 0, but one whose bucket collides, with the other sign
    assert ((vectors[1:] @ vectors[0]) <= 0).all()
    assert (plain.retrieve([[question]]).ids >= 0).all()  # k references scoring 0
    searches = []
    search = strict.index.search
    strict.index.search = lambda *a: (searches.append(a[1]), search(*a))[1]
    found = strict.retrieve([[question]])
    assert (found.ids == -1).all() and not found.memories.valid.any()
    assert searches == [K * strict.overfetch]  # not widened to the whole index
    hit = strict.retrieve([[knowledge_base("english")[1][7]]])
    kept = hit.ids[0, 0][hit.ids[0, 0] >= 0]
    assert kept[0].item() == 7 and (hit.scores[0, 0, : len(kept)] > 0).all()
    with pytest.raises(UserError, match="min_score"):
        make_retriever(min_score=float("nan"))
