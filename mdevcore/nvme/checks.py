"""Checks for state that arrives from a migration stream (untrusted).

Every component's ``from_snapshot``/``check_snapshot`` uses these, so a
bad value always fails the same way: ``Invalid`` (a ValueError) naming
what was wrong, which the state loader turns into EINVAL.
"""

from __future__ import annotations

from typing import Any

U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


class Invalid(ValueError):
    pass


def int_in(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"{what}: {value!r} not in {low}..{high}")
    return value


def list_of(value: Any, length: int | None, what: str) -> list[Any]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise Invalid(f"{what}: expected a list of {length}")
    return value


def dict_of(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{what}: expected an object")
    return value
