"""Dataclass fields that carry their own --help text, so every option is documented where it is defined."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description for --help."""
    return field(default=default, metadata={"help": help})
