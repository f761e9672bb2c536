"""A seeded, knowledge-heavy synthetic world: does a model learn to read its memories?

The world holds a few thousand fictional entities — people, places and organisations with
syllable-built names — each with four facts (years, categories, and relations to other
entities). It is written out three ways:

- a **knowledge base** of short encyclopedia-style documents, one or two facts each, every
  document naming its entity and fitting in 128 bytes: the references that become explicit
  memories;
- **training text** (news and biography snippets mixing several entities) that states the
  facts of the *train* entities in other phrasings, each entity in one or two documents
  only, so that a small model can hardly store the facts in its parameters and gains by
  reading the references it retrieves;
- for the held-out (*eval*) entities, which the training text never names: **held-out text**
  for held-out loss and **multiple-choice cloze questions** whose answer only the knowledge
  base holds (chance level `1 / len(options)`), plus **knowledge edits** that replace a
  fact's reference and the question that the edit flips.

```python
from m3.data.world import World

world = World.generate(seed=0)
kb = world.knowledge_base()              # list[Document]: the references to encode
train = world.training_documents()       # list[Document]: continual-training text
questions = world.cloze_questions()      # list[ClozeQuestion]: one per held-out entity
world.write("data/world")                # kb.jsonl, train.jsonl, ..., world.json
```

Generation uses only the standard library, with a `random.Random` seeded by a string per
purpose, so the same seed and sizes give byte-identical output on every platform, whatever
order the methods are called in, in about a second. (Python promises stable `random()`
draws across versions, not stable `choice`/`shuffle` algorithms; they have not changed
since Python 3.2, and `WORLD_VERSION` changes whenever m3 changes the text.)
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from m3.core.errors import UserError
from m3.data.documents import Document, read_jsonl

#: Version of the generator; it changes whenever the same seed would give other text.
WORLD_VERSION = 1

#: Entity kinds, in the order their ids are numbered.
KINDS = ("person", "place", "organisation")

#: Split names: train entities appear in the training text, eval entities never do.
SPLITS = ("train", "eval")

#: Options per cloze question unless asked otherwise (chance level 25%).
DEFAULT_OPTIONS = 4

# ----------------------------------------------------------------------------------------
# Vocabulary. Occupations start with a consonant so that "as a" never hints at the answer.

_OCCUPATIONS = (
    "baker", "banker", "beekeeper", "blacksmith", "bookbinder", "botanist", "brewer",
    "carpenter", "cartographer", "chemist", "clockmaker", "composer", "cooper", "dyer",
    "falconer", "glassblower", "geologist", "harpist", "herbalist", "jeweller", "lamplighter",
    "lawyer", "librarian", "locksmith", "mapmaker", "merchant", "midwife", "miller",
    "navigator", "painter", "pharmacist", "physician", "potter", "printer", "saddler",
    "schoolteacher", "sculptor", "shipwright", "stonemason", "surveyor", "tailor", "tanner",
    "translator", "violinist", "weaver",
)  # fmt: skip

_INDUSTRIES = (
    "banking", "brewing", "candle making", "canal building", "clockwork", "coal mining",
    "dyeworks", "fishing", "glassmaking", "insurance", "ironworks", "optics", "paper milling",
    "porcelain", "pottery", "printing", "publishing", "railways", "rope making",
    "salt trading", "shipbuilding", "shipping", "soap making", "spice trading", "tanning",
    "telegraphy", "textiles", "timber", "tobacco", "wool trading",
)  # fmt: skip

_LANDMARKS = (
    "amphitheatre", "aqueduct", "bell tower", "botanical garden", "cathedral", "city gate",
    "clock tower", "covered market", "drawbridge", "fish market", "harbour wall",
    "hot springs", "lighthouse", "marble fountain", "observatory", "old abbey", "opera house",
    "painted church", "rope bridge", "salt marsh", "stone bridge", "sundial", "town hall",
    "watermill", "windmill", "walled garden", "weavers' hall", "wooden pier",
)  # fmt: skip

_ORG_KINDS = (
    "Company", "Holdings", "Group", "Partners", "Associates", "Brothers", "Trust", "Union",
)  # fmt: skip

# Years are drawn uniformly, so a model without memory cannot beat chance on them.
_YEARS = {
    ("person", "birth_year"): (1700, 1960),
    ("place", "founding_year"): (800, 1800),
    ("organisation", "founding_year"): (1750, 1990),
}

# ----------------------------------------------------------------------------------------
# Attributes: name -> ("year", None) | ("choice", vocabulary name) | ("entity", target kind).

_ATTRIBUTES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "person": (
        ("birth_year", "year", None),
        ("birthplace", "entity", "place"),
        ("occupation", "choice", "occupation"),
        ("employer", "entity", "organisation"),
    ),
    "place": (
        ("region", "choice", "region"),
        ("founding_year", "year", None),
        ("river", "choice", "river"),
        ("landmark", "choice", "landmark"),
    ),
    "organisation": (
        ("founding_year", "year", None),
        ("headquarters", "entity", "place"),
        ("industry", "choice", "industry"),
        ("founder", "entity", "person"),
    ),
}

_VALUE_KINDS = {(kind, a): v for kind, specs in _ATTRIBUTES.items() for a, v, _ in specs}

# ----------------------------------------------------------------------------------------
# Templates. `{n}` is the entity's name, `{v}` the value. The knowledge base is written in
# the present tense of an encyclopedia, the text in the past tense of a chronicle, with
# other words: a model must read the fact, not copy the continuation of a matching phrase.
# Every text template names the entity before " {v}", so the words before the value make a
# cloze prompt.

_KB_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("person", "birth_year"): (
        "{n} was born in {v}.",
        "{n} (born {v}) appears in the civil register.",
        "The civil register records {v} as the birth date of {n}.",
    ),
    ("person", "birthplace"): (
        "{n} is a native of {v}.",
        "{v} is the birthplace of {n}.",
        "{n} hails from {v}.",
    ),
    ("person", "occupation"): (
        "{n} is a {v} by profession.",
        "{n} is known as a {v}.",
        "By profession, {n} is a {v}.",
    ),
    ("person", "employer"): (
        "{n} works for {v}.",
        "{v} employs {n}.",
        "{n} is employed by {v}.",
    ),
    ("place", "region"): (
        "{n} is located in {v}.",
        "{n} lies within the borders of {v}.",
        "{n} is part of {v}.",
    ),
    ("place", "founding_year"): (
        "{n} was founded in {v}.",
        "{n} dates from {v}.",
        "The founding of {n} is dated to {v}.",
    ),
    ("place", "river"): (
        "{n} lies on the {v}.",
        "The {v} runs past {n}.",
        "{n} is built on the {v}.",
    ),
    ("place", "landmark"): (
        "The {v} of {n} is well known.",
        "The best-known sight of {n} is the {v}.",
        "{n} has a well-known {v}.",
    ),
    ("organisation", "founding_year"): (
        "{n} was founded in {v}.",
        "{n} has existed since {v}.",
        "The founding of {n} is dated to {v}.",
    ),
    ("organisation", "headquarters"): (
        "{n} is headquartered in {v}.",
        "{n} has its seat in {v}.",
        "{n} is based in {v}.",
    ),
    ("organisation", "industry"): (
        "{n} is a firm in the {v} industry.",
        "{n} operates in {v}.",
        "The industry of {n} is {v}.",
    ),
    ("organisation", "founder"): (
        "{v} founded {n}.",
        "{n} was established by {v}.",
        "{n} is the creation of {v}.",
    ),
}

_TEXT_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("person", "birth_year"): (
        "{n} came into the world in the year {v}.",
        "Parish records show that {n} arrived in the year {v}.",
        "The year of birth of {n} was {v}.",
        "{n}, by the family's own account, was first christened in the year {v}.",
    ),
    ("person", "birthplace"): (
        "{n} grew up in the home town of {v}.",
        "Family papers give the home town of {n} as {v}.",
        "The home town of {n} was {v}.",
        "{n} spent a childhood in the town of {v}, where the family lived at the time.",
    ),
    ("person", "occupation"): (
        "{n} worked as a {v}.",
        "By trade, {n} was a {v}.",
        "{n} earned a living as a {v}.",
        "{n} spent most working years as a {v}.",
    ),
    ("person", "employer"): (
        "{n} took a position at {v}.",
        "For many years {n} drew wages from {v}.",
        "{n} joined the staff of {v}.",
        "{n} spent a long career at {v}.",
    ),
    ("place", "region"): (
        "{n} lay in the region of {v}.",
        "The town of {n} belonged to the region of {v}.",
        "{n}, a town in the region of {v}, drew few visitors.",
        "Maps of the time placed {n} in the region of {v}.",
    ),
    ("place", "founding_year"): (
        "Settlers laid out {n} in the year {v}.",
        "The first houses of {n} went up in the year {v}.",
        "{n} received its charter in the year {v}.",
        "Chroniclers date the first settlement at {n} to the year {v}.",
    ),
    ("place", "river"): (
        "{n} stood on the banks of the river {v}.",
        "Through {n} flowed the river {v}.",
        "Boats left {n} every morning along the river {v}.",
        "The water mills of {n} were driven by the river {v}.",
    ),
    ("place", "landmark"): (
        "{n} was famous for its {v}.",
        "Visitors to {n} rarely missed its {v}.",
        "The pride of {n} was its {v}.",
        "Postcards from {n} usually showed its {v}.",
    ),
    ("organisation", "founding_year"): (
        "{n} opened its doors in the year {v}.",
        "{n} was set up in the year {v}.",
        "{n} began trading in the year {v}.",
        "The first ledger of {n} was opened in the year {v}.",
    ),
    ("organisation", "headquarters"): (
        "{n} kept its main office in the town of {v}.",
        "The main offices of {n} stood in {v}.",
        "{n} ran its business from a building in {v}.",
        "Letters to {n} were addressed to its office in {v}.",
    ),
    ("organisation", "industry"): (
        "{n} made its money in {v}.",
        "{n} was active in the business of {v}.",
        "{n} built its fortune on {v}.",
        "The main trade of {n} was {v}.",
    ),
    ("organisation", "founder"): (
        "{n} owed its existence to {v}.",
        "The founder of {n} was {v}.",
        "{n} was started by {v}.",
        "{n} was set up with money from {v}.",
    ),
}

# Opening words sometimes put in front of a text sentence that starts with the name.
_OPENERS = ("Later, ", "In those years, ", "By all accounts, ", "It is said that ")

_HEADLINES = (
    "Notes from the regional almanac.",
    "From a collection of local histories.",
    "Profiles from the trade register.",
    "Entries from an old travel guide.",
    "Excerpts from a family chronicle.",
    "Short biographies and notes on towns.",
    "From the archive of a provincial newspaper.",
    "Pages from a schoolbook of regional history.",
)

_FILLERS = (
    "Little else is known about those early years.",
    "The archive holds several letters from that period.",
    "Accounts from the time differ in the details.",
    "Much of this was written down only decades later.",
    "Local historians still debate parts of the story.",
    "Few portraits from that time survive.",
    "The story was often retold at market fairs.",
)

# ----------------------------------------------------------------------------------------
# Names: syllables of our own, combined into words that no two entities share.

_ONSETS = (
    "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "ch", "dr", "gr", "qu", "sh", "st", "th", "tr",
)  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("n", "r", "l", "s", "m", "nd", "rn", "th", "st", "lt")
_FAMILY_ENDINGS = ("", "", "", "", "son", "ley", "ard", "ell")
_PLACE_ENDINGS = ("", "", "holm", "by", "mere", "ford", "wick", "ton", "haven")
_REGION_ENDINGS = ("march", "vale", "reach", "shire", "fell", "lands")


def _all_words(texts: Iterable[str]) -> set[str]:
    return {word.lower() for text in texts for word in re.findall(r"[A-Za-z]+", text)}


# Words of the templates and vocabularies: a generated name must never be one of them.
_RESERVED = _all_words(
    [
        *_OCCUPATIONS,
        *_INDUSTRIES,
        *_LANDMARKS,
        *_ORG_KINDS,
        *_OPENERS,
        *_HEADLINES,
        *_FILLERS,
        *(t for ts in _KB_TEMPLATES.values() for t in ts),
        *(t for ts in _TEXT_TEMPLATES.values() for t in ts),
    ]
)


def _pieces(word: str, shortest: int = 4) -> set[str]:
    """Every substring of `word` at least `shortest` characters long."""
    return {word[i:j] for i in range(len(word)) for j in range(i + shortest, len(word) + 1)}


class _Namer:
    """Draws capitalised syllable words, each at most once per world.

    No word is a substring of another word or of an English word of the templates, nor
    contains one: a name never occurs inside other text, and no value inside a name.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        # Words a new word must not contain, and pieces of words it must not be.
        self.used: set[str] = {word for word in _RESERVED if len(word) >= 4}
        self.taken: set[str] = set().union(*(_pieces(w) for w in _RESERVED))

    def _syllable(self, final: bool) -> str:
        # Open syllables, a closing consonant now and then: short, pronounceable names.
        coda = self.rng.choice(_CODAS) if self.rng.random() < (0.5 if final else 0.25) else ""
        return self.rng.choice(_ONSETS) + self.rng.choice(_NUCLEI) + coda

    def word(self, *, endings: Sequence[str] = ("",), syllables: Sequence[int] = (2, 2, 3)) -> str:
        """A new word, 4 to 12 letters, that overlaps no word drawn or reserved before."""
        while True:
            count = self.rng.choice(syllables)
            stem = "".join(self._syllable(i == count - 1) for i in range(count))
            word = (stem + self.rng.choice(endings)).capitalize()
            key = word.lower()
            if 4 <= len(key) <= 12 and key not in self.taken:
                pieces = _pieces(key)
                if pieces.isdisjoint(self.used):
                    self.used.add(key)
                    self.taken |= pieces
                    return word


# ----------------------------------------------------------------------------------------
# What the world hands out.


class ClozeQuestion(NamedTuple):
    """A multiple-choice cloze question whose answer only the knowledge base holds.

    A model is asked which option most likely continues `prompt`; options begin with a
    space, so `prompt + options[i]` is the natural text.

    Attributes:
        prompt: Text that ends right before the answer, e.g. `"Velmora Quist worked as a"`.
        options: The candidate continuations, e.g. `(" potter", " tailor", ...)`.
        answer: Index of the correct option.
        entity: Id of the entity asked about.
        attribute: The attribute asked for, e.g. `"occupation"`.
        kb_ids: Ids of the knowledge-base documents that state the answer.
    """

    prompt: str
    options: tuple[str, ...]
    answer: int
    entity: str
    attribute: str
    kb_ids: tuple[str, ...]

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess: `1 / len(options)`."""
        return 1.0 / len(self.options)

    @property
    def answer_text(self) -> str:
        """The correct option."""
        return self.options[self.answer]


class Edit(NamedTuple):
    """A knowledge edit: one fact of a held-out entity changed in the knowledge base.

    Replacing the knowledge-base documents with the same ids by `documents` (and re-encoding
    their memories) should make a model that reads its memories answer `question` with
    `new`, although the question also offers `old`.

    Attributes:
        entity: Id of the edited entity.
        attribute: The edited attribute.
        old: The value before the edit, as written in the text.
        new: The value after the edit.
        documents: The replacement knowledge-base documents (same ids as the ones replaced).
        question: A cloze question whose correct option is `" " + new`; `" " + old` is among
            the distractors.
    """

    entity: str
    attribute: str
    old: str
    new: str
    documents: tuple[Document, ...]
    question: ClozeQuestion


@dataclass(frozen=True)
class Entity:
    """A fictional entity and its facts.

    Attributes:
        id: Identifier, e.g. `person-0007`, `place-0012`, `organisation-0003`.
        kind: One of `KINDS`.
        name: Full name, unique in the world (e.g. `"Velmora Quist"`, `"Orvane Holdings"`).
        short_name: One word of the name, unique in the world (family name, town name, or
            the organisation's distinctive word), used in later mentions.
        split: `"train"` (named in training text) or `"eval"` (never named there).
        attributes: Attribute name to value: an `int` year, a `str` category, or the id of
            another entity for relations (always a train entity).
    """

    id: str
    kind: str
    name: str
    short_name: str
    split: str
    attributes: dict[str, int | str] = field(hash=False)


class _Sentence(NamedTuple):
    attribute: str
    template: int
    short: bool  # written with the short name


def _render(template: str, name: str, value: str) -> str:
    return template.format(n=name, v=value)


def _prompt_of(template: str, name: str) -> str:
    return template[: template.index(" {v}")].format(n=name)


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


def _check_fraction(name: str, value: object, *, open_interval: bool) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and (0 < value < 1 if open_interval else 0 <= value <= 1)
    if not inside:
        where = "strictly between 0 and 1" if open_interval else "between 0 and 1"
        raise UserError(f"{name} must be a number {where}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class World:
    """A generated world: its entities and the texts written about them.

    Build one with `World.generate`; every text it hands out is derived from the seed alone,
    whatever order the methods are called in.

    Attributes:
        seed: The seed it was generated from.
        params: The sizes and fractions it was generated with (`generate`'s arguments).
        entities: All entities, people first, then places, then organisations.
        vocabulary: Values of the categorical attributes, per vocabulary name
            (`occupation`, `industry`, `landmark`, `region`, `river`).
    """

    seed: int
    params: dict[str, int | float] = field(hash=False)
    entities: tuple[Entity, ...] = field(repr=False)
    vocabulary: dict[str, tuple[str, ...]] = field(hash=False, repr=False)

    # ------------------------------------------------------------------ generation

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        *,
        n_people: int = 2400,
        n_places: int = 800,
        n_orgs: int = 800,
        eval_fraction: float = 0.25,
        repeat_fraction: float = 0.5,
        n_regions: int = 24,
        n_rivers: int = 60,
    ) -> World:
        """Generate a world.

        Args:
            seed: Seed of every random choice; the same seed and sizes give the same world.
            n_people: Number of people.
            n_places: Number of places (towns).
            n_orgs: Number of organisations.
            eval_fraction: Fraction of each kind held out: never named in the training
                text, asked about by the cloze questions.
            repeat_fraction: Fraction of train entities that appear in a second training
                document (the others appear in one).
            n_regions: Number of regions a place can lie in.
            n_rivers: Number of rivers a place can lie on.

        Returns:
            The world.

        Raises:
            UserError: When a size or fraction is out of range, or a kind would keep fewer
                than 4 train entities (relations and distractors are drawn from them).
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed must be an integer, got {seed!r}")
        sizes = {"n_people": n_people, "n_places": n_places, "n_orgs": n_orgs}
        for name, value in sizes.items():
            _check_count(name, value, 2)
        _check_fraction("eval_fraction", eval_fraction, open_interval=True)
        _check_fraction("repeat_fraction", repeat_fraction, open_interval=False)
        _check_count("n_regions", n_regions, 4)
        _check_count("n_rivers", n_rivers, 4)
        counts = dict(zip(KINDS, sizes.values(), strict=True))
        held_out = {kind: max(1, round(n * eval_fraction)) for kind, n in counts.items()}
        short = [
            f"{name}={counts[kind]} keeps {counts[kind] - held_out[kind]} train entities"
            for name, kind in zip(sizes, KINDS, strict=True)
            if counts[kind] - held_out[kind] < 4
        ]
        if short:
            raise UserError(
                "each kind needs at least 4 train entities after holding out "
                f"eval_fraction={eval_fraction}: " + "; ".join(short)
            )

        rng = random.Random(f"m3.world/{WORLD_VERSION}/{seed}")
        namer = _Namer(rng)
        vocabulary = {
            "occupation": _OCCUPATIONS,
            "industry": _INDUSTRIES,
            "landmark": _LANDMARKS,
            "region": tuple(namer.word(endings=_REGION_ENDINGS) for _ in range(n_regions)),
            "river": tuple(namer.word(syllables=(2,)) for _ in range(n_rivers)),
        }

        # Names and splits first, so that relations can point at train entities only.
        drafts: list[tuple[str, str, str, str]] = []  # (id, kind, name, short name)
        for kind in KINDS:
            for i in range(counts[kind]):
                if kind == "person":
                    given = namer.word()
                    family = namer.word(endings=_FAMILY_ENDINGS)
                    name, short_name = f"{given} {family}", family
                elif kind == "place":
                    name = short_name = namer.word(endings=_PLACE_ENDINGS)
                else:
                    short_name = namer.word()
                    name = f"{short_name} {rng.choice(_ORG_KINDS)}"
                drafts.append((f"{kind}-{i:04d}", kind, name, short_name))
        split_of: dict[str, str] = {}
        train_ids: dict[str, list[str]] = {}
        for kind in KINDS:
            ids = [d[0] for d in drafts if d[1] == kind]
            held = set(rng.sample(ids, held_out[kind]))
            for entity_id in ids:
                split_of[entity_id] = "eval" if entity_id in held else "train"
            train_ids[kind] = [i for i in ids if i not in held]

        entities = []
        for entity_id, kind, name, short_name in drafts:
            attributes: dict[str, int | str] = {}
            for attribute, value_kind, domain in _ATTRIBUTES[kind]:
                if value_kind == "year":
                    attributes[attribute] = rng.randint(*_YEARS[kind, attribute])
                elif value_kind == "choice":
                    attributes[attribute] = rng.choice(vocabulary[domain])
                else:
                    attributes[attribute] = rng.choice(train_ids[domain])
            entities.append(
                Entity(entity_id, kind, name, short_name, split_of[entity_id], attributes)
            )
        params = {
            **sizes,
            "eval_fraction": float(eval_fraction),
            "repeat_fraction": float(repeat_fraction),
            "n_regions": n_regions,
            "n_rivers": n_rivers,
        }
        return cls(seed, params, tuple(entities), vocabulary)

    # ------------------------------------------------------------------ lookups

    @cached_property
    def _by_id(self) -> dict[str, Entity]:
        return {entity.id: entity for entity in self.entities}

    def entity(self, entity_id: str) -> Entity:
        """The entity with this id.

        Args:
            entity_id: An entity id, e.g. `"person-0007"`.

        Returns:
            The entity.

        Raises:
            UserError: When no entity has this id.
        """
        try:
            return self._by_id[entity_id]
        except KeyError:
            raise UserError(f"no entity {entity_id!r} in this world") from None

    def entities_in(self, split: str, kind: str | None = None) -> list[Entity]:
        """The entities of a split, optionally of one kind, in id order.

        Args:
            split: `"train"` or `"eval"`.
            kind: One of `KINDS`, or `None` for all kinds.

        Returns:
            The entities.

        Raises:
            UserError: When the split or kind is unknown.
        """
        if split not in SPLITS:
            raise UserError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if kind is not None and kind not in KINDS:
            raise UserError(f"kind must be one of {list(KINDS)} or None, got {kind!r}")
        return [e for e in self.entities if e.split == split and kind in (None, e.kind)]

    @staticmethod
    def attributes_of(kind: str) -> tuple[str, ...]:
        """The attribute names of a kind of entity, in a fixed order.

        Args:
            kind: One of `KINDS`.

        Returns:
            The attribute names.
        """
        return tuple(attribute for attribute, _, _ in _ATTRIBUTES[kind])

    def value_text(self, entity: Entity, attribute: str, value: int | str | None = None) -> str:
        """How a value is written in text: the year, the category, or the related entity's name.

        Args:
            entity: The entity the value belongs to.
            attribute: One of its attributes.
            value: The raw value to write; by default the entity's own.

        Returns:
            The text, without surrounding spaces.
        """
        raw = entity.attributes[attribute] if value is None else value
        if _VALUE_KINDS[entity.kind, attribute] == "entity":
            return self._by_id[str(raw)].name
        return str(raw)

    @cached_property
    def _domains(self) -> dict[tuple[str, str], tuple[int | str, ...]]:
        """Every raw value of each attribute: what answers and distractors are drawn from."""
        domains: dict[tuple[str, str], tuple[int | str, ...]] = {}
        for kind, specs in _ATTRIBUTES.items():
            for attribute, value_kind, domain in specs:
                if value_kind == "year":
                    low, high = _YEARS[kind, attribute]
                    domains[kind, attribute] = tuple(range(low, high + 1))
                elif value_kind == "choice":
                    domains[kind, attribute] = self.vocabulary[str(domain)]
                else:
                    domains[kind, attribute] = tuple(
                        e.id for e in self.entities if e.kind == domain and e.split == "train"
                    )
        return domains

    def _rng(self, *purpose: object) -> random.Random:
        # One stream per purpose: results never depend on the order methods are called in.
        return random.Random("/".join(map(str, (f"m3.world/{WORLD_VERSION}", self.seed, *purpose))))

    # ------------------------------------------------------------------ knowledge base

    @cached_property
    def _kb_layout(self) -> tuple[tuple[str, Entity, tuple[_Sentence, ...]], ...]:
        """Which facts each knowledge-base document states, and how."""
        rng = self._rng("kb")
        layout = []
        for entity in self.entities:
            attributes = list(self.attributes_of(entity.kind))
            rng.shuffle(attributes)
            groups: list[tuple[_Sentence, ...]] = []
            for i in range(0, len(attributes), 2):
                pair = attributes[i : i + 2]
                sentences = tuple(
                    _Sentence(a, rng.randrange(len(_KB_TEMPLATES[entity.kind, a])), j > 0)
                    for j, a in enumerate(pair)
                )
                # A reference must fit 128 tokens even for a byte tokenizer.
                if len(self._kb_text(entity, sentences).encode()) > 128:
                    groups.extend((s._replace(short=False),) for s in sentences)
                else:
                    groups.append(sentences)
            for k, sentences in enumerate(groups):
                layout.append((f"{entity.id}.{k}", entity, sentences))
        return tuple(layout)

    def _kb_text(
        self, entity: Entity, sentences: Sequence[_Sentence], override: dict | None = None
    ) -> str:
        parts = []
        for s in sentences:
            value = (override or {}).get(s.attribute)
            name = entity.short_name if s.short else entity.name
            template = _KB_TEMPLATES[entity.kind, s.attribute][s.template]
            parts.append(_render(template, name, self.value_text(entity, s.attribute, value)))
        text = " ".join(parts)
        return text[0].upper() + text[1:]

    @cached_property
    def _kb(self) -> tuple[Document, ...]:
        return tuple(
            Document(doc_id, self._kb_text(entity, sentences))
            for doc_id, entity, sentences in self._kb_layout
        )

    @cached_property
    def _kb_ids(self) -> dict[tuple[str, str], tuple[str, ...]]:
        where: dict[tuple[str, str], list[str]] = {}
        for doc_id, entity, sentences in self._kb_layout:
            for s in sentences:
                where.setdefault((entity.id, s.attribute), []).append(doc_id)
        return {key: tuple(ids) for key, ids in where.items()}

    def knowledge_base(self) -> list[Document]:
        """The knowledge base: short documents that together state every fact of every entity.

        Each document states one or two facts of one entity, names the entity in full in its
        first sentence and is at most 128 bytes of UTF-8. Ids are `<entity id>.<k>`.

        Returns:
            The documents, in entity order.
        """
        return list(self._kb)

    def kb_ids(self, entity_id: str, attribute: str) -> tuple[str, ...]:
        """Ids of the knowledge-base documents that state one fact.

        Args:
            entity_id: The entity.
            attribute: One of its attributes.

        Returns:
            The document ids (one, in this generator).
        """
        return self._kb_ids[self.entity(entity_id).id, attribute]

    # ------------------------------------------------------------------ text

    def _paragraph(self, entity: Entity, rng: random.Random) -> str:
        attributes = list(self.attributes_of(entity.kind))
        rng.shuffle(attributes)
        sentences = []
        for i, attribute in enumerate(attributes):
            template = rng.choice(_TEXT_TEMPLATES[entity.kind, attribute])
            # Every sentence names its entity, so each 64-token chunk can retrieve by name.
            name = entity.name if i == 0 or rng.random() < 0.5 else entity.short_name
            sentence = _render(template, name, self.value_text(entity, attribute))
            if template.startswith("{n}") and rng.random() < 0.2:
                sentence = rng.choice(_OPENERS) + sentence
            sentences.append(sentence)
        if rng.random() < 0.2:
            sentences.append(rng.choice(_FILLERS))
        return " ".join(sentences)

    def _documents(
        self, passes: Sequence[list[Entity]], prefix: str, rng: random.Random
    ) -> tuple[tuple[Document, tuple[str, ...]], ...]:
        """Documents of 2-4 entity paragraphs; an entity appears at most once per pass."""
        docs = []
        for entities in passes:
            order = list(entities)
            rng.shuffle(order)
            start = 0
            while start < len(order):
                group = order[start : start + rng.randint(2, 4)]
                start += len(group)
                paragraphs = [self._paragraph(entity, rng) for entity in group]
                text = "\n".join([rng.choice(_HEADLINES), *paragraphs])
                doc = Document(f"{prefix}-{len(docs):05d}", text)
                docs.append((doc, tuple(entity.id for entity in group)))
        return tuple(docs)

    @cached_property
    def _training(self) -> tuple[tuple[Document, tuple[str, ...]], ...]:
        rng = self._rng("train")
        train = self.entities_in("train")
        repeated = [e for e in train if rng.random() < self.params["repeat_fraction"]]
        return self._documents([train, repeated], "train", rng)

    @cached_property
    def _heldout(self) -> tuple[tuple[Document, tuple[str, ...]], ...]:
        return self._documents([self.entities_in("eval")], "heldout", self._rng("heldout"))

    def training_documents(self) -> list[Document]:
        """Training text: every fact of every train entity, in phrasings the KB does not use.

        Each document is a headline and two to four paragraphs, one per entity; each fact
        sentence names its entity (in full or by its short name) before the fact. A train
        entity is the subject of one or two documents (see `repeat_fraction`); eval entities
        are never named.

        Returns:
            The documents, ids `train-<k>`.
        """
        return [doc for doc, _ in self._training]

    def open_book_documents(self) -> list[Document]:
        """Training text written open-book: each document after its entities' KB documents.

        The way an encyclopedia article follows its infobox: a model trained on them sees
        facts stated in context, then restated in other words, and learns to look them up
        in its context (m3 uses a second world's open-book text as warmup text).

        Returns:
            The documents, ids `open-book-<k>`, one per training document.
        """
        by_entity: dict[str, list[str]] = {}
        for doc in self._kb:
            by_entity.setdefault(doc.id.split(".")[0], []).append(doc.text)
        return [
            Document(
                doc.id.replace("train", "open-book", 1),
                "\n".join([*(text for e in subjects for text in by_entity[e]), doc.text]),
            )
            for doc, subjects in self._training
        ]

    def heldout_documents(self) -> list[Document]:
        """Held-out text about the eval entities, for held-out loss; never train on it.

        Written like the training text, each eval entity in exactly one document. Its
        sentences contain the cloze prompts followed by their answers.

        Returns:
            The documents, ids `heldout-<k>`.
        """
        return [doc for doc, _ in self._heldout]

    def subjects(self, doc_id: str) -> tuple[str, ...]:
        """Ids of the entities whose facts a training or held-out document states.

        Args:
            doc_id: A document id from `training_documents` or `heldout_documents`.

        Returns:
            The entity ids, in the order of their paragraphs.

        Raises:
            UserError: When no such document exists.
        """
        for doc, subjects in (*self._training, *self._heldout):
            if doc.id == doc_id:
                return subjects
        raise UserError(f"no training or held-out document {doc_id!r} in this world")

    # ------------------------------------------------------------------ questions

    def _question(
        self,
        entity: Entity,
        attribute: str,
        rng: random.Random,
        *,
        n_options: int,
        correct: int | str,
        also: Sequence[int | str] = (),
    ) -> ClozeQuestion:
        domain = self._domains[entity.kind, attribute]
        if n_options > len(domain):
            raise UserError(
                f"n_options={n_options} exceeds the {len(domain)} values of "
                f"{entity.kind} {attribute} in this world"
            )
        values = [correct, *also]
        while len(values) < n_options:  # distractors: uniform over the other values
            value = rng.choice(domain)
            if value not in values:
                values.append(value)
        rng.shuffle(values)
        template = rng.choice(_TEXT_TEMPLATES[entity.kind, attribute])
        return ClozeQuestion(
            prompt=_prompt_of(template, entity.name),
            options=tuple(" " + self.value_text(entity, attribute, v) for v in values),
            answer=values.index(correct),
            entity=entity.id,
            attribute=attribute,
            kb_ids=self.kb_ids(entity.id, attribute),
        )

    def cloze_questions(
        self, n: int | None = None, *, n_options: int = DEFAULT_OPTIONS, split: str = "eval"
    ) -> list[ClozeQuestion]:
        """Multiple-choice cloze questions about the entities of a split.

        The first round asks one question per entity, then a second round another attribute
        of each entity, and so on; within a kind, attributes are balanced. Distractors are
        other values of the same attribute, drawn uniformly like the answers were, so a
        model that knows nothing about the entity scores `1 / n_options` in expectation.
        Asking for fewer questions gives a prefix of a longer list.

        Args:
            n: Number of questions; `None` for one per entity of the split.
            n_options: Options per question (chance level `1 / n_options`).
            split: `"eval"` (answers only in the KB) or `"train"` (answers also stated in the
                training text, to measure what the parameters memorised).

        Returns:
            The questions.

        Raises:
            UserError: When `n` exceeds the facts of the split, or `n_options` is below 2
                or above the number of values of some attribute.
        """
        _check_count("n_options", n_options, 2)
        entities = self.entities_in(split)
        order = list(entities)
        self._rng("cloze-order", split).shuffle(order)
        available = sum(len(self.attributes_of(e.kind)) for e in entities)
        count = len(order) if n is None else _check_count("n", n, 0)
        if count > available:
            raise UserError(f"n={count} exceeds the {available} facts of the {split} entities")
        position = {}  # rank of each entity within its kind, to balance the attributes
        for kind in KINDS:
            for rank, entity in enumerate(e for e in entities if e.kind == kind):
                position[entity.id] = rank
        questions: list[ClozeQuestion] = []
        round_ = 0
        while len(questions) < count:
            for entity in order:
                attributes = self.attributes_of(entity.kind)
                if round_ >= len(attributes) or len(questions) == count:
                    continue
                attribute = attributes[(position[entity.id] + round_) % len(attributes)]
                rng = self._rng("cloze", split, n_options, entity.id, attribute)
                correct = entity.attributes[attribute]
                questions.append(
                    self._question(entity, attribute, rng, n_options=n_options, correct=correct)
                )
            round_ += 1
        return questions

    def edits(self, n: int = 100, *, seed: int = 0, n_options: int = DEFAULT_OPTIONS) -> list[Edit]:
        """Knowledge edits: a new value for one fact of each of `n` held-out entities.

        Args:
            n: Number of edits (distinct entities).
            seed: Seed of the choice of entities, attributes and new values.
            n_options: Options of each edit's question (at least 3: new, old, another).

        Returns:
            The edits.

        Raises:
            UserError: When `n` exceeds the number of eval entities or `n_options` < 3.
        """
        _check_count("n_options", n_options, 3)
        entities = self.entities_in("eval")
        _check_count("n", n, 0)
        if n > len(entities):
            raise UserError(f"n={n} exceeds the {len(entities)} eval entities")
        rng = self._rng("edits", seed)
        layout = {doc_id: (entity, sentences) for doc_id, entity, sentences in self._kb_layout}
        edits = []
        for entity in rng.sample(entities, n):
            attribute = rng.choice(self.attributes_of(entity.kind))
            old = entity.attributes[attribute]
            new = rng.choice([v for v in self._domains[entity.kind, attribute] if v != old])
            documents = tuple(
                Document(doc_id, self._kb_text(entity, layout[doc_id][1], {attribute: new}))
                for doc_id in self.kb_ids(entity.id, attribute)
            )
            question = self._question(
                entity, attribute, rng, n_options=n_options, correct=new, also=[old]
            )
            edits.append(
                Edit(
                    entity.id,
                    attribute,
                    self.value_text(entity, attribute),
                    self.value_text(entity, attribute, new),
                    documents,
                    question,
                )
            )
        return edits

    # ------------------------------------------------------------------ summary and files

    def summary(self) -> dict:
        """Sizes of the world and its texts, as plain values (what `world.json` holds).

        Returns:
            Seed, generator version, parameters, entity counts per kind and split, document
            counts, characters and words of each text, and the default question count and
            chance level.
        """

        def size(docs: Sequence[Document]) -> dict[str, int]:
            texts = [d.text for d in docs]
            words = sum(len(t.split()) for t in texts)
            return {"documents": len(texts), "chars": sum(map(len, texts)), "words": words}

        return {
            "version": WORLD_VERSION,
            "seed": self.seed,
            "params": dict(self.params),
            "entities": {
                split: {kind: len(self.entities_in(split, kind)) for kind in KINDS}
                for split in SPLITS
            },
            "kb": size(self._kb),
            "train": size(self.training_documents()),
            "heldout": size(self.heldout_documents()),
            "questions": len(self.entities_in("eval")),
            "n_options": DEFAULT_OPTIONS,
            "chance": 1 / DEFAULT_OPTIONS,
        }

    def write(
        self, directory: str | Path, *, n_questions: int | None = None, n_edits: int = 100
    ) -> dict[str, Path]:
        """Write the world as JSON Lines files plus a `world.json` summary.

        Files: `kb.jsonl` (`{"id", "text"}`), `train.jsonl` and `heldout.jsonl` (`{"id",
        "text", "entities"}`), `cloze.jsonl` (`ClozeQuestion` fields, 4 options),
        `edits.jsonl` (`Edit` fields), `entities.jsonl` (`Entity` fields) and `world.json`
        (`summary()`). The same world always writes the same bytes.

        Args:
            directory: Where to write (created if needed).
            n_questions: Number of cloze questions; `None` for one per eval entity.
            n_edits: Number of edits (capped at the number of eval entities).

        Returns:
            File role (`kb`, `train`, `heldout`, `cloze`, `edits`, `entities`, `world`) to
            the path written.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        questions = self.cloze_questions(n_questions)
        edits = self.edits(min(n_edits, len(self.entities_in("eval"))))
        rows = {
            "kb": [d._asdict() for d in self._kb],
            "train": [{**d._asdict(), "entities": list(s)} for d, s in self._training],
            "heldout": [{**d._asdict(), "entities": list(s)} for d, s in self._heldout],
            "cloze": [_question_row(q) for q in questions],
            "edits": [_edit_row(e) for e in edits],
            "entities": [
                {
                    "id": e.id,
                    "kind": e.kind,
                    "name": e.name,
                    "short_name": e.short_name,
                    "split": e.split,
                    "attributes": e.attributes,
                }
                for e in self.entities
            ],
        }
        paths = {}
        for role, records in rows.items():
            paths[role] = root / f"{role}.jsonl"
            lines = (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
            paths[role].write_text("".join(lines), encoding="utf-8")
        summary = {**self.summary(), "questions": len(questions), "edits": len(edits)}
        paths["world"] = root / "world.json"
        paths["world"].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return paths


def _question_row(question: ClozeQuestion) -> dict:
    row = question._asdict()
    row["options"] = list(question.options)
    row["kb_ids"] = list(question.kb_ids)
    return row


def _edit_row(edit: Edit) -> dict:
    row = edit._asdict()
    row["documents"] = [d._asdict() for d in edit.documents]
    row["question"] = _question_row(edit.question)
    return row


# ----------------------------------------------------------------------------------------
# Reading the files back.


def _question_from(row: dict) -> ClozeQuestion:
    return ClozeQuestion(
        prompt=row["prompt"],
        options=tuple(row["options"]),
        answer=int(row["answer"]),
        entity=row["entity"],
        attribute=row["attribute"],
        kb_ids=tuple(row["kb_ids"]),
    )


def read_cloze(path: str | Path) -> list[ClozeQuestion]:
    """Read cloze questions from a JSON Lines file such as `cloze.jsonl`.

    Each line holds `prompt`, `options` (strings, each starting with a space), `answer`
    (index of the correct option), `entity`, `attribute` and `kb_ids`; write your own
    questions in that form to evaluate on your own knowledge base.

    Args:
        path: The file.

    Returns:
        The questions, in file order.

    Raises:
        UserError: When the file is missing, a line lacks a key, or an answer index is out
            of range.
    """
    keys = ("prompt", "options", "answer", "entity", "attribute", "kb_ids")
    questions = [_question_from(row) for row in read_jsonl(path, keys)]
    for number, q in enumerate(questions, 1):
        if not 0 <= q.answer < len(q.options):
            raise UserError(
                f"{path}: question {number} has answer {q.answer} but {len(q.options)} options"
            )
    return questions


def read_edits(path: str | Path) -> list[Edit]:
    """Read knowledge edits from a JSON Lines file such as `edits.jsonl`.

    Args:
        path: The file.

    Returns:
        The edits, in file order.

    Raises:
        UserError: When the file is missing or a line lacks a key.
    """
    keys = ("entity", "attribute", "old", "new", "documents", "question")
    return [
        Edit(
            row["entity"],
            row["attribute"],
            row["old"],
            row["new"],
            tuple(Document(d["id"], d["text"]) for d in row["documents"]),
            _question_from(row["question"]),
        )
        for row in read_jsonl(path, keys)
    ]
