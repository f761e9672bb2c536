"""A look at the synthetic test world: its texts, questions and edits, written and read back.

`python docs/examples/world_tour.py world` writes a small world into the folder `world`.
"""

from __future__ import annotations

import sys

from m3.data.documents import read_corpus
from m3.data.stdlib_text import stdlib_documents
from m3.data.world import World, read_cloze


def tour(directory: str, sizes: dict[str, int] | None = None, max_chars: int = 200_000) -> World:
    """Generate a world, print a sample of everything it holds and write it to `directory`."""
    sizes = sizes or {"n_people": 240, "n_places": 80, "n_orgs": 80}  # small, for a quick look
    world = World.generate(seed=0, **sizes)
    kb = world.knowledge_base()
    train = world.training_documents()
    questions = world.cloze_questions()
    print(len(kb), "references,", len(train), "training documents,", len(questions), "questions")
    print(questions[0].prompt, questions[0].options, "answer:", questions[0].answer)

    edit = world.edits(1)[0]
    print(edit.old, "->", edit.new, edit.documents[0].text)

    paths = world.write(directory)  # {kb, train, heldout, cloze, edits, entities}.jsonl, world.json
    assert read_cloze(paths["cloze"]) == questions
    # the document files read back like any other corpus
    assert read_corpus([paths["kb"]]).documents == kb

    # ordinary English prose for the warmup, shipped with Python: no download
    prose = stdlib_documents(max_chars=max_chars)
    print(len(prose), "documents,", sum(len(d.text) for d in prose), "characters")
    return world


if __name__ == "__main__":
    tour(sys.argv[1])
