"""Shared fixtures: a tiny model config and a seeded generator."""

from __future__ import annotations

import pytest


@pytest.fixture
def seed() -> int:
    return 1234
