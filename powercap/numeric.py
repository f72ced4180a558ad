"""Small numeric helpers shared by the decisions and the simulator's models, and how a count reads."""

from __future__ import annotations


def clamp(value: float, low: float, high: float) -> float:
    """``min(max(value, low), high)``."""
    return low if value < low else high if value > high else value


def counted(number: int, noun: str) -> str:
    """``1 GPU``, ``4 GPUs``, ``0 pods``: a count with its noun in the right number."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
