"""Small numeric helpers shared by the decisions and the simulator's models, and how a count reads."""

from __future__ import annotations

import math
import sys
from typing import TypeGuard

LARGEST_FLOAT_INT = int(sys.float_info.max)
"""The largest integer with a float. JSON and YAML bound no integer's digits; past this one
``float()`` and ``math.isfinite`` raise OverflowError, which no reader of a document expects."""


def is_finite_number(value: object) -> TypeGuard[float]:
    """An int or float (not a bool) with a finite float value: what a document's number must be
    before ``float()`` (an integer of 400 digits is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -LARGEST_FLOAT_INT <= value <= LARGEST_FLOAT_INT
    return math.isfinite(value)


def clamp(value: float, low: float, high: float) -> float:
    """``min(max(value, low), high)``."""
    return low if value < low else high if value > high else value


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``1 GPU``, ``4 GPUs``, ``0 pods``, ``2 policies`` (``plural`` for a noun not made with -s):
    a count with its noun in the right number."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def agreeing(number: int, one: str, many: str) -> str:
    """``one`` when ``number`` is 1, else ``many``: the words after a count that agree with it
    (``f"{counted(n, 'GPU')} {agreeing(n, 'runs above its', 'run above their')} allocation"``)."""
    return one if number == 1 else many
