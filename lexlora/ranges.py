"""The allowed values of a numeric config key, checked with a message that states the range."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from lexlora.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: from `low` to `high` (either may be open or absent)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # when a value in the range still needs something else

    def check(self, key: str, value: Any, allows_none: bool = False) -> None:
        if value is None and allows_none:  # an Optional key's "unset"
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            raise ConfigError(f"{key} must be {self}, got {value}")

    def __str__(self) -> str:
        if self.high is None:
            text = f"more than {self.low}" if self.low_open else f"at least {self.low}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{text} ({self.note})" if self.note else text
