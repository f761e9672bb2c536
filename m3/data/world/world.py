"""`World`: a generated world, its entities and every text written about them.

`World.generate` draws the entities (`m3.data.world.entities`); the world then writes its
knowledge base, training and held-out text, cloze questions and edits from the tables of
`m3.data.world.words`, each from its own random stream, so that nothing depends on the
order its methods are called in; `World.write` writes them all to files
(`m3.data.world.files` reads the questions and edits back).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from m3.core.checks import check_int
from m3.core.errors import UserError
from m3.data.documents import Document
from m3.data.world.entities import KINDS, SPLITS, WORLD_VERSION, Entity, draw_entities
from m3.data.world.files import DEFAULT_OPTIONS, ClozeQuestion, Edit, edit_row, question_row
from m3.data.world.words import (
    ATTRIBUTES,
    FILLERS,
    HEADLINES,
    KB_TEMPLATES,
    OPENERS,
    TEXT_TEMPLATES,
    VALUE_KINDS,
    YEARS,
    prompt_of,
    render,
)


class _Sentence(NamedTuple):
    attribute: str
    template: int
    short: bool  # written with the short name


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
        seed = check_int(None, "seed", seed, low=None)
        params, entities, vocabulary = draw_entities(
            seed,
            n_people=n_people,
            n_places=n_places,
            n_orgs=n_orgs,
            eval_fraction=eval_fraction,
            repeat_fraction=repeat_fraction,
            n_regions=n_regions,
            n_rivers=n_rivers,
        )
        return cls(seed, params, entities, vocabulary)

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
        return tuple(attribute for attribute, _, _ in ATTRIBUTES[kind])

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
        if VALUE_KINDS[entity.kind, attribute] == "entity":
            return self._by_id[str(raw)].name
        return str(raw)

    @cached_property
    def _domains(self) -> dict[tuple[str, str], tuple[int | str, ...]]:
        """Every raw value of each attribute: what answers and distractors are drawn from."""
        domains: dict[tuple[str, str], tuple[int | str, ...]] = {}
        for kind, specs in ATTRIBUTES.items():
            for attribute, value_kind, domain in specs:
                if value_kind == "year":
                    low, high = YEARS[kind, attribute]
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
                    _Sentence(a, rng.randrange(len(KB_TEMPLATES[entity.kind, a])), j > 0)
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
            template = KB_TEMPLATES[entity.kind, s.attribute][s.template]
            parts.append(render(template, name, self.value_text(entity, s.attribute, value)))
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
            template = rng.choice(TEXT_TEMPLATES[entity.kind, attribute])
            # Every sentence names its entity, so each 64-token chunk can retrieve by name.
            name = entity.name if i == 0 or rng.random() < 0.5 else entity.short_name
            sentence = render(template, name, self.value_text(entity, attribute))
            if template.startswith("{n}") and rng.random() < 0.2:
                sentence = rng.choice(OPENERS) + sentence
            sentences.append(sentence)
        if rng.random() < 0.2:
            sentences.append(rng.choice(FILLERS))
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
                text = "\n".join([rng.choice(HEADLINES), *paragraphs])
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
        template = rng.choice(TEXT_TEMPLATES[entity.kind, attribute])
        return ClozeQuestion(
            prompt=prompt_of(template, entity.name),
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
        check_int(None, "n_options", n_options, low=2)
        entities = self.entities_in(split)
        order = list(entities)
        self._rng("cloze-order", split).shuffle(order)
        available = sum(len(self.attributes_of(e.kind)) for e in entities)
        count = len(order) if n is None else check_int(None, "n", n, low=0)
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
        check_int(None, "n_options", n_options, low=3)
        entities = self.entities_in("eval")
        n = check_int(None, "n", n, low=0)
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
            "cloze": [question_row(q) for q in questions],
            "edits": [edit_row(e) for e in edits],
            "entities": [asdict(e) for e in self.entities],
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
