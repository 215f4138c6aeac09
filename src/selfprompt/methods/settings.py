"""A method's settings: one dataclass per method, at once its recipe section (``--lora.rank``), what its
model's constructor takes and, added to :class:`~selfprompt.model.ClassifierConfig`, what its adapter's
``adapter_config.json`` stores under ``"model"`` (:func:`adapter_config`).

Naming: the model ``LoRA``, its settings ``LoRASettings``, its adapter config ``LoRAConfig``; settings that
several models take are named after themselves (``PromptSettings``). Where a recipe section also holds what
a run reads before training and an adapter does not store (the prompts' initializer, a pruning file), the
section is a subclass ``<Name>RunSettings`` adding those fields, and a model given it keeps its own
settings' fields only. A settings dataclass states its range rules once, in ``problems()``: config
validation (``selfprompt.config.check_config``) runs them before any run folder exists, and the model's
constructor runs the same ones (:func:`check_settings`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from selfprompt.model import ClassifierConfig

S = TypeVar("S")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, least: int = 1) -> bool:
    """An integer >= ``least``."""
    return is_integer(value) and value >= least


def in_range(value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> bool:
    """A finite number in [low, high) (the ends open or closed as asked)."""
    if not is_number(value):
        return False
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)


def number_problem(name: str, value: Any, low: float, high: float, rule: str, **ends: bool) -> list[str]:
    """``[]`` when ``value`` is in range, else one ``name must be RULE, got VALUE`` line; a value that is not
    finite is named as such (``name must be a finite number, got nan``)."""
    if in_range(value, low, high, **ends):
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{name} must be a finite number, got {value!r}"]
    return [f"{name} must be {rule}, got {value!r}"]


def check_settings(section: str, settings: Any) -> None:
    """Raise ValueError naming every problem of ``settings`` (its ``problems()``) as ``section.field``."""
    problems = settings.problems() if hasattr(settings, "problems") else []
    if problems:
        raise ValueError("; ".join(f"{section}.{problem}" for problem in problems) + ".")


def settings_from(
    section: str,
    cls: type[S],
    settings: S | None,
    kwargs: dict[str, Any],
    owner: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> S:
    """``settings`` (default ``cls(**defaults)``) with the fields ``kwargs`` names replaced, checked
    (:func:`check_settings`). Those fields are removed from ``kwargs``, so a constructor taking ``settings=``
    or the fields by name passes the rest on; with ``owner`` (the model's name) a leftover is refused. A
    subclass instance (a ``<Name>RunSettings`` section) gives ``cls``'s fields only."""
    names = [f.name for f in dataclasses.fields(cls)]
    if settings is None:
        settings = cls(**(defaults or {}))
    elif not isinstance(settings, cls):
        raise TypeError(
            f"{owner or section} takes its settings as a {cls.__name__} (or its fields by name, e.g. "
            f"{names[0]}=...), got {type(settings).__name__} {settings!r}."
        )
    elif type(settings) is not cls:
        settings = cls(**{name: getattr(settings, name) for name in names})
    settings = dataclasses.replace(settings, **{name: kwargs.pop(name) for name in names if name in kwargs})
    if owner is not None and kwargs:
        raise TypeError(f"{owner} got unknown arguments {sorted(kwargs)}; its settings are {cls.__name__}'s.")
    check_settings(section, settings)
    return settings


def adapter_config(
    settings: type,
    base: type = ClassifierConfig,
    name: str | None = None,
    extra: list[tuple[str, type, Any]] | None = None,
) -> type:
    """The adapter config of a model with ``settings``: ``base``'s fields, then the settings', then
    ``extra`` ``(name, type, default)`` fields the model decides itself (a subclass of both, so
    ``model.config.rank`` and ``model.config.num_classes`` both read)."""
    name = name or settings.__name__.removesuffix("Settings") + "Config"
    more = [(field, kind, dataclasses.field(default=default)) for field, kind, default in extra or []]
    cls = dataclasses.make_dataclass(name, more, bases=(settings, base))
    cls.__module__ = settings.__module__
    cls.__doc__ = f"What an adapter stores: {base.__name__}'s fields plus :class:`{settings.__name__}`'s."
    return cls
