"""m3: Memory³ (language modeling with explicit memory) as modular PyTorch Lightning components.

Importing `m3` is cheap: the heavy parts (torch, Lightning) load only when a name that needs
them is first used, so `m3 --help` and `m3 check` answer quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it, imported on first use
_LAZY = {
    "Config": "m3.config",
    "Memory3": "m3.model",
    "KVCache": "m3.model",
    "Memories": "m3.memory",
    "UserError": "m3.errors",
}

if TYPE_CHECKING:
    from m3.config import Config
    from m3.errors import UserError
    from m3.memory import Memories
    from m3.model import KVCache, Memory3

__all__ = ["Config", "KVCache", "Memories", "Memory3", "UserError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'm3' has no attribute {name!r}")
