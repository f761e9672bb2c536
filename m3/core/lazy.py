"""Names that load on first use, and old module paths that point to their new homes.

Subpackages export their public names lazily, so that importing one (which every submodule
import does) loads no torch or Lightning until a name that needs them is used: `m3 --help`
and `m3 check` stay fast. Modules that moved keep importing from their old path for one
release, with a `DeprecationWarning` naming the new one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

#: Modules of m3 0.1's flat layout -> where they live now. Their old paths import for one
#: more release, with a DeprecationWarning.
MOVED_MODULES = {
    f"m3.{old}": f"m3.{new}"
    for old, new in {
        "errors": "core.errors",
        "registry": "core.registry",
        "runs": "core.runs",
        "plots": "core.plots",
        "config": "model.config",
        "checkpoints": "model.checkpoints",
        "tokenizer": "data.tokenizer",
        "chunking": "data.chunking",
        "documents": "data.documents",
        "sources": "data.sources",
        "stdlib_text": "data.stdlib_text",
        "world": "data.world",
        "encoding": "memory.encoder",
        "sparsify": "memory.sparsifier",
        "quantize": "memory.quantize",
        "embedders": "retrieval.embedders",
        "overlap": "retrieval.overlap",
        "editing": "bank.edit",
        "module": "training.module",
        "fit": "training.fit",
        "generate": "inference.generate",
        "evaluate": "inference.evaluate",
        "diagnostics": "inference.diagnostics",
    }.items()
}


def lazy_exports(
    package: str, exports: Mapping[str, str], moved: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` for names defined in its submodules.

    Args:
        package: The package's `__name__`.
        exports: Public name -> the module that defines it, imported on first use.
        moved: Name -> its new module, for names the package's old module exported that
            now live elsewhere; using one warns with a `DeprecationWarning`.

    Returns:
        `(__getattr__, __dir__)`, to assign at the package's top level.
    """
    moved = dict(moved or {})

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in moved:
            warnings.warn(
                f"{package}.{name} moved to {moved[name]}.{name}; the old path will be "
                "removed in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            value = getattr(importlib.import_module(moved[name]), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return value

    def __dir__() -> list[str]:
        return sorted({*exports, *vars(sys.modules[package])})

    return __getattr__, __dir__


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds modules by their old path and hands out the module at its new one.

    Installed once by `m3/__init__.py`. Importing an old path warns with a
    `DeprecationWarning` naming the new one; the old name then refers to the new module
    itself, so its classes are the same objects (pickles that name the old path still load).

    Args:
        moved: Old module name -> new module name.
    """

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        """A spec for an old module path, None for every other name.

        Args:
            fullname: The module being imported.
            path: The parent package's path (unused).
            target: A module being reloaded (unused).

        Returns:
            A spec whose loader is this finder, or None.
        """
        if fullname not in self.moved:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: Any) -> None:
        """The default module object: `exec_module` replaces it.

        Args:
            spec: The spec `find_spec` returned.
        """
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        """Point the old name at the new module, with a warning.

        Args:
            module: The placeholder module of the old name.
        """
        old, new = module.__name__, self.moved[module.__name__]
        warnings.warn(
            f"{old} moved to {new}; the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        # the import system returns what sys.modules holds once this returns
        sys.modules[old] = importlib.import_module(new)
