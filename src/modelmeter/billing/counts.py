"""Field-by-field arithmetic for the usage value types (``Usage``, ``Amount``, ``Tally``): one definition of
adding two counts, instead of an adder written out per type."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

T = TypeVar("T")


def fieldwise(a: T, b: T, *, sign: int = 1) -> T:
    """A copy of dataclass ``a`` with ``sign * b``'s fields added to its own."""
    values = {f.name: getattr(a, f.name) + sign * getattr(b, f.name) for f in fields(a)}  # type: ignore[arg-type]
    return replace(a, **values)  # type: ignore[type-var]


def add_into(target: Any, other: Any) -> None:
    """Add ``other``'s fields into the mutable dataclass ``target``."""
    for f in fields(target):
        setattr(target, f.name, getattr(target, f.name) + getattr(other, f.name))
