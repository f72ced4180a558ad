"""Small numeric helpers shared by the decisions and the simulator's models."""

from __future__ import annotations


def clamp(value: float, low: float, high: float) -> float:
    """``min(max(value, low), high)``."""
    return low if value < low else high if value > high else value
