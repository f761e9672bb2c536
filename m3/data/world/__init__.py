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

The package has one module per concept, and every name below imports from the package:
`words` (vocabularies, templates, the namer), `entities` (`Entity` and the seeded draw),
`world` (`World`), `files` (`ClozeQuestion`, `Edit`, and reading their files back).
"""

from __future__ import annotations

from m3.data.world.entities import KINDS, SPLITS, WORLD_VERSION, Entity
from m3.data.world.files import DEFAULT_OPTIONS, ClozeQuestion, Edit, read_cloze, read_edits
from m3.data.world.world import World

__all__ = [
    "DEFAULT_OPTIONS",
    "KINDS",
    "SPLITS",
    "WORLD_VERSION",
    "ClozeQuestion",
    "Edit",
    "Entity",
    "World",
    "read_cloze",
    "read_edits",
]
