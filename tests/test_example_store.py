"""The guide's own store (docs/examples/my_store.py) passes the store contract suite.

The part between the snippet markers is shown in docs/guides/writing-a-component.md: it is
what a user writes next to `tests/test_backends_contract.py` to test their store.
"""

# ruff: noqa: E402 - the imports of the part shown in the guide follow the path setup

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
sys.path.insert(0, str(EXAMPLES))  # a user's my_store.py sits on their path

# --8<-- [start:contract]
import pytest
from my_store import DirectoryStore
from test_backends_contract import *  # noqa: F403 - the contract tests
from test_backends_contract import StoreFactory, flip_byte


def damage(store: DirectoryStore, reference_id: int) -> None:
    """Flip one byte of a stored reference's file, as a failing disk would."""
    flip_byte(store.directory / f"{reference_id}.ref", 100)


DIRECTORY = StoreFactory(
    "directory",
    create=lambda directory, info: DirectoryStore(directory / "bank", info=info),
    reopen=lambda store: DirectoryStore(store.directory),  # as the next process opens it
    footprint=lambda store: len(list(store.directory.glob("*.ref"))),  # files on disk
    damage=damage,
)


@pytest.fixture(params=[DIRECTORY], ids=lambda f: f.name)
def store_factory(request):
    return request.param


@pytest.fixture(params=[DIRECTORY], ids=lambda f: f.name)
def damageable_factory(request):
    return request.param


# --8<-- [end:contract]
