"""The entities of the synthetic world, and the seeded draw of their names, splits and facts.

`draw_entities` is the first step of `World.generate`: from the seed alone it draws the
region and river names, every entity's name, which entities are held out (`SPLITS`), and
four facts per entity, relations pointing at train entities only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from m3.core.checks import check_fraction, check_int
from m3.core.errors import UserError
from m3.data.world.words import (
    ATTRIBUTES,
    FAMILY_ENDINGS,
    INDUSTRIES,
    LANDMARKS,
    OCCUPATIONS,
    ORG_KINDS,
    PLACE_ENDINGS,
    REGION_ENDINGS,
    YEARS,
    Namer,
)

#: Version of the generator; it changes whenever the same seed would give other text.
WORLD_VERSION = 1

#: Entity kinds, in the order their ids are numbered.
KINDS = ("person", "place", "organisation")

#: Split names: train entities appear in the training text, eval entities never do.
SPLITS = ("train", "eval")


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


def draw_entities(
    seed: int,
    *,
    n_people: int,
    n_places: int,
    n_orgs: int,
    eval_fraction: float,
    repeat_fraction: float,
    n_regions: int,
    n_rivers: int,
) -> tuple[dict[str, int | float], tuple[Entity, ...], dict[str, tuple[str, ...]]]:
    """Draw a world's entities: names, splits and facts (see `World.generate` for the Args).

    Args:
        seed: Seed of every random choice.
        n_people: Number of people.
        n_places: Number of places (towns).
        n_orgs: Number of organisations.
        eval_fraction: Fraction of each kind held out.
        repeat_fraction: Fraction of train entities that appear in a second training
            document (recorded in the parameters; the texts use it).
        n_regions: Number of regions a place can lie in.
        n_rivers: Number of rivers a place can lie on.

    Returns:
        The parameters (`World.params`), the entities (people, places, organisations) and
        the vocabulary of the categorical attributes.

    Raises:
        UserError: When a size or fraction is out of range, or a kind would keep fewer
            than 4 train entities.
    """
    seed = check_int(None, "seed", seed, low=None)
    sizes = {"n_people": n_people, "n_places": n_places, "n_orgs": n_orgs}
    sizes = {name: check_int(None, name, value, low=2) for name, value in sizes.items()}
    check_fraction(None, "eval_fraction", eval_fraction, open_interval=True)
    check_fraction(None, "repeat_fraction", repeat_fraction, open_interval=False)
    n_regions = check_int(None, "n_regions", n_regions, low=4)
    n_rivers = check_int(None, "n_rivers", n_rivers, low=4)
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
    namer = Namer(rng)
    vocabulary = {
        "occupation": OCCUPATIONS,
        "industry": INDUSTRIES,
        "landmark": LANDMARKS,
        "region": tuple(namer.word(endings=REGION_ENDINGS) for _ in range(n_regions)),
        "river": tuple(namer.word(syllables=(2,)) for _ in range(n_rivers)),
    }

    # Names and splits first, so that relations can point at train entities only.
    drafts: list[tuple[str, str, str, str]] = []  # (id, kind, name, short name)
    for kind in KINDS:
        for i in range(counts[kind]):
            if kind == "person":
                given = namer.word()
                family = namer.word(endings=FAMILY_ENDINGS)
                name, short_name = f"{given} {family}", family
            elif kind == "place":
                name = short_name = namer.word(endings=PLACE_ENDINGS)
            else:
                short_name = namer.word()
                name = f"{short_name} {rng.choice(ORG_KINDS)}"
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
        for attribute, value_kind, domain in ATTRIBUTES[kind]:
            if value_kind == "year":
                attributes[attribute] = rng.randint(*YEARS[kind, attribute])
            elif value_kind == "choice":
                attributes[attribute] = rng.choice(vocabulary[domain])
            else:
                attributes[attribute] = rng.choice(train_ids[domain])
        entities.append(Entity(entity_id, kind, name, short_name, split_of[entity_id], attributes))
    params = {
        **sizes,
        "eval_fraction": float(eval_fraction),
        "repeat_fraction": float(repeat_fraction),
        "n_regions": n_regions,
        "n_rivers": n_rivers,
    }
    return params, tuple(entities), vocabulary
