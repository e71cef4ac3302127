"""Config fields that carry their own --help text and value check: each option is defined, documented
and validated in one place, and a bad value is one error naming its dotted key."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any

Check = Callable[[str, Any], "str | None"]  # (key, value) -> what is wrong with it, or None


def opt(default: Any, help: str, check: Check | None = None) -> Any:
    """A dataclass field with a default, a one-line description for --help and a check of its value."""
    return field(default=default, metadata={"help": help, "check": check})


def at_least(low: float, note: str = "") -> Check:
    return lambda key, value: None if value >= low else f"{key} must be >= {low}{note}, got {value!r}"


def above(low: float) -> Check:
    return lambda key, value: None if value > low else f"{key} must be > {low}, got {value!r}"


def below_one() -> Check:
    """A value in [0, 1), e.g. Adam's betas."""
    return lambda key, value: None if 0 <= value < 1 else f"{key} must be in [0, 1), got {value!r}"


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda key, value: None if value in choices else f"unknown {key} {value!r}; expected one of {choices}"


def not_empty() -> Check:
    return lambda key, value: None if value.strip() else f"{key} must not be empty"


def any_value() -> Check:
    """Every value of the key's type is valid (booleans): the type check alone applies."""
    return lambda key, value: None


def check_section(name: str, section: Any) -> None:
    """Type (from the annotations) and value (from each field's check) of every key of one config
    section; a ValueError naming the first bad key as `name.key`."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        key, value = f"{name}.{f.name}", getattr(section, f.name)
        problem = _type_problem(key, value, hints.get(f.name))
        check = f.metadata.get("check")
        if problem is None and check is not None:
            problem = check(key, value)
        if problem is not None:
            raise ValueError(problem)


def _type_problem(key: str, value: Any, expected: Any) -> str | None:
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"{key} must be a finite number, got {value!r}"
    elif expected is str:
        ok = isinstance(value, str)
    else:  # an annotation this function does not know: the key's own check decides
        return None
    return None if ok else f"{key} must be of type {expected.__name__}, got {type(value).__name__} {value!r}"
