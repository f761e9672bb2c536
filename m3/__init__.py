"""m3: Memory³ (language modeling with explicit memory) as modular PyTorch Lightning components.

Importing `m3` is cheap: the heavy parts (torch, Lightning) load only when a name that needs
them is first used, so `m3 --help` and `m3 check` answer quickly. The subpackages, from the
bottom layer up, are described on the docs' Architecture page.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from m3.core.lazy import MOVED_MODULES, MovedModules, lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from m3.core.errors import UserError
    from m3.core.memories import Memories
    from m3.model.config import Config
    from m3.model.kv_cache import KVCache
    from m3.model.memory3 import Memory3

__all__ = ["Config", "KVCache", "Memories", "Memory3", "UserError", "__version__"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Config": "m3.model.config",
        "Memory3": "m3.model.memory3",
        "KVCache": "m3.model.kv_cache",
        "Memories": "m3.core.memories",
        "UserError": "m3.core.errors",
    },
)

if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
    # first, so that an old path never finds a stale file of an earlier install
    sys.meta_path.insert(0, MovedModules(MOVED_MODULES))
