"""Real English text that every Python installation carries: no download needed.

Two sources, both part of the standard library:

- `pydoc_data.topics`: the help topics of the Python Language Reference (about 0.5 MB of
  prose on statements, expressions and the data model);
- the docstrings of a fixed list of pure-Python standard library modules without import side
  effects (`DEFAULT_MODULES`): module, class, function, method and property docstrings, as
  `inspect.getdoc` cleans them.

```python
from m3.data.stdlib_text import stdlib_documents

docs = stdlib_documents(max_chars=1_000_000)    # list[Document], ids "pydoc:with", "doc:json"
```

The order is fixed (topics and modules interleaved, each sorted), so the same Python
version always gives the same documents; another Python version gives somewhat other text.
m3 uses this text to give warmup training a realistic language-modelling loss on a CPU.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator, Sequence
from itertools import chain, zip_longest

from m3.core.errors import UserError
from m3.data.documents import Document

#: Modules whose docstrings are collected: importing them has no side effects.
DEFAULT_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "collections.abc",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "email.utils", "enum", "fnmatch", "fractions", "functools",
    "gettext", "glob", "graphlib", "heapq", "hmac", "html.parser", "http.client",
    "http.cookies", "inspect", "ipaddress", "itertools", "json", "json.decoder",
    "json.encoder", "locale", "logging", "logging.handlers", "mailbox", "numbers", "operator",
    "optparse", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shlex", "shutil", "statistics", "string", "struct", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "types", "typing",
    "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)  # fmt: skip

#: Default cap on the total number of characters returned.
DEFAULT_MAX_CHARS = 1_000_000


def pydoc_topics() -> list[Document]:
    """The Language Reference help topics of `pydoc_data.topics`, one document per topic.

    Returns:
        The documents, sorted by topic, ids `pydoc:<topic>`.
    """
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{name}", topics[name].strip()) for name in sorted(topics)]


def _public(namespace: dict, exported: Sequence[str] | None) -> Iterator[tuple[str, object]]:
    names = exported if exported is not None else (n for n in namespace if not n.startswith("_"))
    for name in sorted(set(names)):
        if name in namespace:
            yield name, namespace[name]


def _sections(module_name: str, seen: set[int], seen_text: set[str]) -> list[str]:
    """Module, class, function and method docstrings of one module, each once per run."""
    module = importlib.import_module(module_name)
    sections = []

    def add(title: str, obj: object) -> None:
        doc = obj.__doc__ if isinstance(obj, property) else inspect.getdoc(obj)
        # The same object re-exported elsewhere, or a docstring inherited unchanged, once.
        if not isinstance(doc, str) or id(obj) in seen or doc.strip() in seen_text:
            return
        seen.add(id(obj))
        seen_text.add(doc.strip())
        sections.append(f"{title}\n{inspect.cleandoc(doc)}")

    add(module_name, module)
    for name, obj in _public(vars(module), getattr(module, "__all__", None)):
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(f"{module_name}.{name}", obj)
        if inspect.isclass(obj):
            for attribute, member in _public(dict(vars(obj)), None):
                if inspect.isroutine(member) or isinstance(member, property):
                    add(f"{module_name}.{name}.{attribute}", member)
    return sections


def module_docstrings(modules: Sequence[str] = DEFAULT_MODULES) -> list[Document]:
    """The docstrings of standard library modules, one document per module.

    Each document holds the module's docstring and those of its public classes, functions,
    methods and properties, each after a line naming it. An object re-exported by a later
    module, or a docstring seen before, is not repeated.

    Args:
        modules: Module names, in the order to collect them.

    Returns:
        The documents, ids `doc:<module>`; a module with no docstrings gives none.

    Raises:
        UserError: When a module cannot be imported.
    """
    seen: set[int] = set()
    seen_text: set[str] = set()
    documents = []
    for name in modules:
        try:
            sections = _sections(name, seen, seen_text)
        except ImportError as error:
            raise UserError(f"cannot import standard library module {name!r}: {error}") from None
        if sections:
            documents.append(Document(f"doc:{name}", "\n\n".join(sections)))
    return documents


def stdlib_documents(
    *, max_chars: int | None = DEFAULT_MAX_CHARS, modules: Sequence[str] = DEFAULT_MODULES
) -> list[Document]:
    """Standard library prose: help topics and docstrings, interleaved, up to a size cap.

    Topics (sorted by name) and module documents (in `modules` order) alternate, so a small
    cap still gives both kinds of text. Documents are taken whole until the next one would
    pass the cap; that one is cut at the last whitespace before the cap, and the rest dropped.

    Args:
        max_chars: Cap on the total number of characters, or `None` for everything
            (about a million characters on Python 3.11).
        modules: Modules whose docstrings are collected.

    Returns:
        The documents; their texts sum to at most `max_chars` characters.

    Raises:
        UserError: When `max_chars` is not a positive integer or a module cannot be imported.
    """
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
    ):
        raise UserError(f"max_chars must be a positive integer or None, got {max_chars!r}")
    pairs = zip_longest(pydoc_topics(), module_docstrings(modules))
    documents = []
    left = max_chars
    for document in (d for d in chain.from_iterable(pairs) if d is not None):
        if left is not None and len(document.text) > left:
            head = document.text[:left]
            if not document.text[left].isspace():
                head = re.sub(r"\S+$", "", head)  # the cap falls inside a word: drop it
            if head.strip():
                documents.append(Document(document.id, head.rstrip()))
            break
        documents.append(document)
        if left is not None:
            left -= len(document.text)
    return documents
