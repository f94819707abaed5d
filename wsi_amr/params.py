"""How job parameters check themselves and travel: one error type naming the field, and the
round trip through plain JSON data that the manifest stores.

Every job takes a frozen dataclass (``TissueParams``, ``TileParams``, ``QuadtreeJobParams``,
``SegmentParams``, ``ClassifyParams``) that validates itself once, in ``__post_init__``. A bad
value raises :class:`ParameterError`, whose message names the dataclass field (``min_tissue``),
never a command-line flag: the CLI maps the field to its flag (``--min-tissue``) and prints one line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar


class ParameterError(ValueError):
    """A parameter value the library cannot work with. ``fields`` are the names of the dataclass
    fields the message speaks of, as they appear in it, so that a front end can rename them."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


E = TypeVar("E", bound=BaseException)


def naming(exc: E, *fields: str) -> E:
    """``exc`` marked as naming the parameters ``fields`` in its message (any error class can)."""
    exc.fields = fields  # type: ignore[attr-defined]
    return exc


def carry(new: E, old: BaseException) -> E:
    """``new`` naming the parameters ``old`` named (when one error is re-raised as another)."""
    return naming(new, *getattr(old, "fields", ()))


def flag_text(exc: BaseException, flags: Mapping[str, str] | None = None) -> str:
    """The message of ``exc`` as a command line front end says it: each parameter it names (its
    ``fields``) written as a flag, ``flags[name]`` where given, else ``--name-with-dashes``."""
    text = str(exc)
    for name in getattr(exc, "fields", ()):
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, text, count=1)
    return text


def require(ok: bool, message: str, *fields: str) -> None:
    """Raise :class:`ParameterError` with ``message`` unless ``ok``."""
    if not ok:
        raise ParameterError(message, *fields)


def require_positive(name: str, value: float | None) -> None:
    """``value`` is None or a positive finite number."""
    require(value is None or (math.isfinite(value) and value > 0), f"{name} must be a positive number, got {value}",
            name)


def require_fraction(name: str, value: float) -> None:
    """``value`` lies in [0, 1]."""
    require(0.0 <= value <= 1.0, f"{name} must be between 0 and 1, got {value}", name)


def require_one_of(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    require(value in choices, f"{name} must be {', '.join(map(str, choices[:-1]))} or {choices[-1]}, not {value!r}",
            name)


P = TypeVar("P")


def from_fields(cls: type[P], data: Mapping[str, Any]) -> P:
    """``cls(**data)`` for the keys that are fields of the dataclass ``cls``; lists become tuples
    where the field is a tuple (JSON has no tuples). A missing field takes its default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) and "tuple" in str(fields[key].type) else value
    return cls(**kwargs)
