"""Sections that are a component's constructor arguments: `training:`, `data:`, `trainer:`.

Such a section says each option once, where the component takes it: its keys, types,
ranges, defaults and documentation are those of the constructor's parameters (Google-style
`Args:` of the class), read by `m3.recipes.signatures` without importing the component.

- `training:` is `m3.training.module.Memory3Module`'s arguments; m3 sets `model`, `stage`,
  `reference_prefix`, `encoder`, `sparsifier` and `total_steps` itself;
- `data:` is `m3.training.datamodule.TextDataModule`'s; m3 sets `tokenizer`, `seed`,
  `chunker`, `embedder`, `chunk_length` and `memories`;
- `trainer:` is `lightning.Trainer`'s; m3 sets `logger`, `callbacks`, `default_root_dir` and
  `enable_checkpointing`.

`training.memories` is `TextDataModule`'s `memories` (the data module reads the bank), kept
next to `training.encode` that it goes with. A parameter annotated with a kind's base class,
or a list of them (`train: Sequence[TextSource]`), takes component specs of that kind.

A checked section is a read-only mapping of its values, every value readable as an attribute
too (`recipe.training.lr`), so that code builds the component from it directly:

```python
module = Memory3Module(**recipe.training.arguments(), model=config, stage=recipe.stage, ...)
```
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import types
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from m3.core import registry
from m3.core.values import Bounds
from m3.recipes.defaults import TRAINER
from m3.recipes.signatures import Signature, locate, signature, stands_for

_EMPTY = inspect.Parameter.empty
#: A coefficient of AdamW's running averages (`training.betas`).
_BETA = Annotated[float, Bounds(ge=0, lt=1)]
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_LISTS = (list, tuple, collections.abc.Sequence, collections.abc.Collection)


def _plain(value: Any) -> Any:
    # defaults as YAML would give them: (0.9, 0.95) is [0.9, 0.95]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Section(Mapping[str, Any]):
    """A recipe section that holds the constructor arguments of one component.

    Subclasses name the component and what m3 passes it itself; everything else about the
    options comes from the constructor. Built with the section's values (the unset ones get
    their defaults); a key that is no option is a `TypeError`, as for any constructor.

    Args:
        values: The section's values, as a checked recipe holds them.
        **more: More values, by keyword.
    """

    #: The component, `"module:Class"`.
    component: ClassVar[str]
    #: Arguments that m3 passes itself -> where m3 takes them from. A recipe may not set them.
    provided: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: Keys held for another constructor -> that constructor's class, `"module:Class"`.
    borrowed: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: Where a borrowed key is listed: key -> the option it comes before (default: last).
    placed: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: Ranges m3 holds arguments to, beyond their annotations.
    bounds: ClassVar[Mapping[str, Bounds]] = MappingProxyType({})
    #: Types m3 holds arguments to instead of their annotations, where an annotation is
    #: looser than what the component accepts (`Sequence[float]` for two numbers in [0, 1)).
    narrowed: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: The values a recipe writes out when it leaves them unset (and so fingerprints); None:
    #: every option, with its constructor's default.
    written: ClassVar[Mapping[str, Any] | None] = None

    def __init__(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        given = {**(values or {}), **more}
        defaults_ = self.defaults()
        unknown = [k for k in given if k not in defaults_ and k not in self.options()]
        if unknown:
            name = type(self).__name__
            raise TypeError(f"{name} got unknown options {unknown}; options: {self.options()}")
        object.__setattr__(self, "_values", {**defaults_, **given})

    # ------------------------------------------------------------------------- the options
    @classmethod
    def signature(cls) -> Signature:
        """The component's constructor, read from its source."""
        return signature(cls.component)

    @classmethod
    def owner(cls, key: str) -> Signature:
        """The constructor that takes an option: the component's, or the one it is borrowed for.

        Args:
            key: An option of the section.

        Returns:
            The constructor's signature.
        """
        return signature(cls.borrowed[key]) if key in cls.borrowed else cls.signature()

    @classmethod
    def options(cls) -> list[str]:
        """The keys a recipe may set, in the constructor's order (borrowed ones `placed`)."""
        return _options(cls)

    @classmethod
    def hint(cls, key: str) -> Any:
        """The type an option's value is checked against: its annotation, with `bounds`.

        Args:
            key: An option of the section.

        Returns:
            The annotation, or the type m3 holds it to (`narrowed`), with its `bounds`
            (`Annotated[..., Bounds(...)]`).
        """
        hint = cls.narrowed[key] if key in cls.narrowed else cls.owner(key).hint(key)
        return Annotated[hint, cls.bounds[key]] if key in cls.bounds else hint

    @classmethod
    def doc(cls, key: str) -> str:
        """An option's documentation: its entry in the constructor's `Args:`.

        Args:
            key: An option of the section.

        Returns:
            The entry, on one line; empty when the constructor does not document it.
        """
        return cls.owner(key)[key].doc

    @classmethod
    def default(cls, key: str) -> Any:
        """An option's value when a recipe leaves it unset.

        Args:
            key: An option of the section.

        Returns:
            The written default of `written`, else the constructor's default (None for a
            parameter the constructor requires: the command that builds it asks for it).
        """
        if cls.written is not None and key in cls.written:
            return _plain(cls.written[key])
        default = cls.owner(key)[key].default
        return None if default is _EMPTY else _plain(default)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The values every recipe holds for the section, unset ones included (`written`)."""
        return dict(_defaults(cls))

    @classmethod
    def components(cls) -> dict[str, tuple[str, bool]]:
        """The options that take component specs: key -> (kind, whether a list of them)."""
        return dict(_components(cls))

    # ------------------------------------------------------------------------- the values
    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._values:
            return self._values[name]
        if name in self.options():  # an option no recipe wrote out: its default
            return self.default(name)
        raise AttributeError(f"{type(self).__name__} has no option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._values!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._values,))

    def arguments(self) -> dict[str, Any]:
        """The values that are the component's own arguments (without the borrowed keys)."""
        return {k: v for k, v in self._values.items() if k not in self.borrowed}


@functools.cache
def _options(cls: type[Section]) -> list[str]:
    own = cls.signature()
    names = [a.name for a in own.arguments if a.kind in _KEYWORD and a.name not in cls.provided]
    for key in cls.borrowed:
        before = cls.placed.get(key)
        names.insert(names.index(before) if before in names else len(names), key)
    return names


@functools.cache
def _defaults(cls: type[Section]) -> Mapping[str, Any]:
    keys = list(cls.written) if cls.written is not None else cls.options()
    return MappingProxyType({key: cls.default(key) for key in keys})


@functools.cache
def _components(cls: type[Section]) -> Mapping[str, tuple[str, bool]]:
    bases = {kind.base.rpartition(":")[2]: name for name, kind in registry.KINDS.items()}
    found = {}
    for key in cls.options():
        owner = cls.owner(key)
        named = [kind for word, kind in bases.items() if word in owner.words(key)]
        if not named:  # (reading the annotation's words is cheaper than evaluating it)
            continue
        hint = owner.hint(key)
        located = {locate(registry.KINDS[kind].base): kind for kind in named}
        many, inner = _unwrap(hint)
        kind = located.get(stands_for(inner) or "")
        if kind is not None:
            found[key] = (kind, many)
    return MappingProxyType(found)


def _unwrap(hint: Any) -> tuple[bool, Any]:
    # `Sequence[X] | None` -> (True, X); `X | None` -> (False, X)
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    if get_origin(hint) in (Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        hint = members[0] if len(members) == 1 else hint
    if get_origin(hint) in _LISTS and get_args(hint):
        return True, get_args(hint)[0]
    return False, hint


# ---------------------------------------------------------------------------------------
# The sections


class DataSection(Section):
    """The `data:` section: the arguments of `m3.training.datamodule.TextDataModule`.

    Where the text comes from and how it becomes training sequences. `train`, `val` and
    `knowledge` are lists of sources (kind `source`); training stages need `train`. Each
    option is documented on `TextDataModule`; the recipes guide lists them.

    Args:
        values: The section's values.
        **more: More values, by keyword.
    """

    component = "m3.training.datamodule:TextDataModule"
    provided = MappingProxyType(
        {
            "tokenizer": "the recipe's tokenizer",
            "seed": "the recipe's seed",
            "chunker": "the recipe's chunker",
            "embedder": "the recipe's embedder",
            "chunk_length": "model.chunk_length",
            "memories": "training.memories",
        }
    )


class TrainingSection(Section):
    """The `training:` section: the arguments of `m3.training.module.Memory3Module`.

    Optimisation settings of a training stage, and `memories`, the bank that
    `encode: store` reads (`TextDataModule`'s `memories`). Each option is documented on its
    constructor; the recipes guide lists them.

    Args:
        values: The section's values.
        **more: More values, by keyword.
    """

    component = "m3.training.module:Memory3Module"
    provided = MappingProxyType(
        {
            "model": "the model section",
            "stage": "the recipe's stage",
            "total_steps": "trainer.max_steps",
            "reference_prefix": "the tokenizer",
            "encoder": "the recipe's encoder",
            "sparsifier": "the recipe's sparsifier",
        }
    )
    borrowed = MappingProxyType({"memories": "m3.training.datamodule:TextDataModule"})
    placed = MappingProxyType({"memories": "init_weights"})  # where recipes have written it
    # AdamW takes exactly two coefficients, each in [0, 1); the annotation says Sequence[float]
    narrowed = MappingProxyType({"betas": tuple[_BETA, _BETA]})


class TrainerSection(Section):
    """The `trainer:` section: arguments of Lightning's `Trainer` (the same names and types).

    Any argument of `lightning.Trainer` may be set, except those m3 sets itself; DDP and
    FSDP need no code change. `m3.recipes.defaults.TRAINER` holds m3's own defaults, written
    out in every recipe; the step counts and intervals are held to positive values.

    Args:
        values: The section's values.
        **more: More values, by keyword.
    """

    component = "lightning.pytorch:Trainer"
    provided = MappingProxyType(
        {
            "logger": "m3 logs to logs/metrics.csv in the run folder",
            "callbacks": "m3 checkpoints to checkpoints/ in the run folder",
            "enable_checkpointing": "m3 checkpoints every stage, to resume it",
            "default_root_dir": "output",
        }
    )
    bounds = MappingProxyType(
        {
            "max_steps": Bounds(ge=1),
            "num_nodes": Bounds(ge=1),
            "accumulate_grad_batches": Bounds(ge=1),
            "gradient_clip_val": Bounds(ge=0),
            "val_check_interval": Bounds(gt=0),
            "limit_val_batches": Bounds(ge=0),
            "log_every_n_steps": Bounds(ge=1),
        }
    )
    written = TRAINER

    def to_kwargs(self) -> dict[str, Any]:
        """The options as `Trainer` keyword arguments (unset ones left to Lightning)."""
        kwargs = {k: v for k, v in self.items() if v is not None}
        if isinstance(self.get("val_check_interval"), int):
            # validate every N steps across epochs, even when an epoch is shorter than N
            kwargs.setdefault("check_val_every_n_epoch", None)
        return kwargs
