"""The words of the synthetic world: vocabularies, attributes, templates, and the namer.

Everything the generator writes comes from these tables: the categorical values
(`OCCUPATIONS`, `INDUSTRIES`, `LANDMARKS`, `ORG_KINDS`), the attributes of each kind of
entity (`ATTRIBUTES`, with `YEARS` for the years), the sentence templates of the knowledge
base (`KB_TEMPLATES`, present tense) and of the text (`TEXT_TEMPLATES`, past tense, other
words), and the names, drawn by `Namer` from syllables so that no name occurs inside other
text. Changing any of them changes the text a seed gives: bump `WORLD_VERSION` then.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

# ----------------------------------------------------------------------------------------
# Vocabulary. Occupations start with a consonant so that "as a" never hints at the answer.

OCCUPATIONS = (
    "baker", "banker", "beekeeper", "blacksmith", "bookbinder", "botanist", "brewer",
    "carpenter", "cartographer", "chemist", "clockmaker", "composer", "cooper", "dyer",
    "falconer", "glassblower", "geologist", "harpist", "herbalist", "jeweller", "lamplighter",
    "lawyer", "librarian", "locksmith", "mapmaker", "merchant", "midwife", "miller",
    "navigator", "painter", "pharmacist", "physician", "potter", "printer", "saddler",
    "schoolteacher", "sculptor", "shipwright", "stonemason", "surveyor", "tailor", "tanner",
    "translator", "violinist", "weaver",
)  # fmt: skip

INDUSTRIES = (
    "banking", "brewing", "candle making", "canal building", "clockwork", "coal mining",
    "dyeworks", "fishing", "glassmaking", "insurance", "ironworks", "optics", "paper milling",
    "porcelain", "pottery", "printing", "publishing", "railways", "rope making",
    "salt trading", "shipbuilding", "shipping", "soap making", "spice trading", "tanning",
    "telegraphy", "textiles", "timber", "tobacco", "wool trading",
)  # fmt: skip

LANDMARKS = (
    "amphitheatre", "aqueduct", "bell tower", "botanical garden", "cathedral", "city gate",
    "clock tower", "covered market", "drawbridge", "fish market", "harbour wall",
    "hot springs", "lighthouse", "marble fountain", "observatory", "old abbey", "opera house",
    "painted church", "rope bridge", "salt marsh", "stone bridge", "sundial", "town hall",
    "watermill", "windmill", "walled garden", "weavers' hall", "wooden pier",
)  # fmt: skip

ORG_KINDS = (
    "Company", "Holdings", "Group", "Partners", "Associates", "Brothers", "Trust", "Union",
)  # fmt: skip

# Years are drawn uniformly, so a model without memory cannot beat chance on them.
YEARS = {
    ("person", "birth_year"): (1700, 1960),
    ("place", "founding_year"): (800, 1800),
    ("organisation", "founding_year"): (1750, 1990),
}

# ----------------------------------------------------------------------------------------
# Attributes: name -> ("year", None) | ("choice", vocabulary name) | ("entity", target kind).

ATTRIBUTES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
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

VALUE_KINDS = {(kind, a): v for kind, specs in ATTRIBUTES.items() for a, v, _ in specs}

# ----------------------------------------------------------------------------------------
# Templates. `{n}` is the entity's name, `{v}` the value. The knowledge base is written in
# the present tense of an encyclopedia, the text in the past tense of a chronicle, with
# other words: a model must read the fact, not copy the continuation of a matching phrase.
# Every text template names the entity before " {v}", so the words before the value make a
# cloze prompt.

KB_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
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

TEXT_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
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
OPENERS = ("Later, ", "In those years, ", "By all accounts, ", "It is said that ")

HEADLINES = (
    "Notes from the regional almanac.",
    "From a collection of local histories.",
    "Profiles from the trade register.",
    "Entries from an old travel guide.",
    "Excerpts from a family chronicle.",
    "Short biographies and notes on towns.",
    "From the archive of a provincial newspaper.",
    "Pages from a schoolbook of regional history.",
)

FILLERS = (
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
FAMILY_ENDINGS = ("", "", "", "", "son", "ley", "ard", "ell")
PLACE_ENDINGS = ("", "", "holm", "by", "mere", "ford", "wick", "ton", "haven")
REGION_ENDINGS = ("march", "vale", "reach", "shire", "fell", "lands")


def _all_words(texts: Iterable[str]) -> set[str]:
    return {word.lower() for text in texts for word in re.findall(r"[A-Za-z]+", text)}


# Words of the templates and vocabularies: a generated name must never be one of them.
_RESERVED = _all_words(
    [
        *OCCUPATIONS,
        *INDUSTRIES,
        *LANDMARKS,
        *ORG_KINDS,
        *OPENERS,
        *HEADLINES,
        *FILLERS,
        *(t for ts in KB_TEMPLATES.values() for t in ts),
        *(t for ts in TEXT_TEMPLATES.values() for t in ts),
    ]
)


def _pieces(word: str, shortest: int = 4) -> set[str]:
    """Every substring of `word` at least `shortest` characters long."""
    return {word[i:j] for i in range(len(word)) for j in range(i + shortest, len(word) + 1)}


class Namer:
    """Draws capitalised syllable words, each at most once per world.

    No word is a substring of another word or of an English word of the templates, nor
    contains one: a name never occurs inside other text, and no value inside a name.

    Args:
        rng: The world's random stream; every draw advances it.
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
        """A new word, 4 to 12 letters, that overlaps no word drawn or reserved before.

        Args:
            endings: Endings to draw one from (e.g. `PLACE_ENDINGS`); `""` for none.
            syllables: Syllable counts to draw one from.

        Returns:
            The word, capitalised.
        """
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


def render(template: str, name: str, value: str) -> str:
    """A template's sentence: `{n}` replaced by the name, `{v}` by the value.

    Args:
        template: A template of `KB_TEMPLATES` or `TEXT_TEMPLATES`.
        name: The entity's name (full or short).
        value: The value as written in text.

    Returns:
        The sentence.
    """
    return template.format(n=name, v=value)


def prompt_of(template: str, name: str) -> str:
    """A cloze prompt: a text template's words up to the value, with the name filled in.

    Args:
        template: A template of `TEXT_TEMPLATES` (each has `" {v}"` after the name).
        name: The entity's full name.

    Returns:
        The prompt, ending right before the value's space.
    """
    return template[: template.index(" {v}")].format(n=name)
