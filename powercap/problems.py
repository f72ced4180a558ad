"""Validation problems: one message per bad field, with its path.

Paths are written the way the apiserver and kubectl write them,
``spec.rackConstraints[1].maxPower``, so a user can find the field in the YAML.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong (or suspicious) with a document, at ``path``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(frozen=True)
class ValidationResult:
    """Every error and every warning found in one document.

    Errors make the document invalid; warnings describe legal but suspicious settings.
    """

    errors: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def join_path(parent: str, child: str | int) -> str:
    """``join_path("spec", "powerCapLimit") == "spec.powerCapLimit"``; ints become ``[i]``."""
    if isinstance(child, int):
        return f"{parent}[{child}]"
    return f"{parent}.{child}" if parent else child
