"""Whether two label selectors can select a common pod.

Two PowerCappingPolicies in one namespace must not both govern a pod: it would have two
power budgets. Whether they can is a question about their selectors alone, answered here
without looking at any pod, so a policy can be refused before a pod exists.

A selector is a conjunction: ``matchLabels {k: v}`` means ``k In (v)``, and a pod matches
when every requirement holds. Two selectors A and B select a common pod iff the
conjunction of all requirements of A and B is satisfiable by some label set. Requirements
on different keys are independent, so it is satisfiable iff it is satisfiable key by key.
For one key ``k``, with the requirements of both selectors on ``k``::

    present  = some In or Exists on k        (the label must be set)
    absent   = some DoesNotExist on k        (the label must not be set)
    allowed  = intersection of the In value sets (every value when there is no In)
    excluded = union of the NotIn value sets

    satisfiable(k) = not present and not absent             -> leave k unset
                   | not present and absent                 -> leave k unset (NotIn holds)
                   | present and not absent and allowed - excluded is not empty
                                                            -> set k to such a value

With no In, ``allowed`` is the infinite set of label values, so a value outside the finite
``excluded`` always exists. The answer is exact for the four Kubernetes operators. It is
conservative where unsure: a requirement with an unknown operator is ignored, which can
only turn "disjoint" into "may overlap", never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import count

from powercap.policies import LabelSelector, SelectorRequirement

KNOWN_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


@dataclass
class _KeyConstraint:
    """Everything the requirements on one label key demand."""

    present: bool = False
    absent: bool = False
    allowed: set[str] | None = None  # None: every value
    excluded: set[str] = field(default_factory=set)

    def add(self, requirement: SelectorRequirement) -> None:
        if requirement.operator == "In":
            self.present = True
            values = set(requirement.values)
            self.allowed = values if self.allowed is None else self.allowed & values
        elif requirement.operator == "NotIn":
            self.excluded |= set(requirement.values)
        elif requirement.operator == "Exists":
            self.present = True
        elif requirement.operator == "DoesNotExist":
            self.absent = True
        # an unknown operator constrains nothing here: conservative, see the module docstring

    def example_value(self) -> str | None:
        """A value of the label that meets every requirement; "" means "leave it unset";
        None means no label state meets them."""
        if not self.present:
            return ""
        if self.absent:
            return None
        if self.allowed is not None:
            candidates = sorted(self.allowed - self.excluded)
            return candidates[0] if candidates else None
        return next(value for value in _fresh_values() if value not in self.excluded)


def _fresh_values() -> Iterator[str]:
    yield "x"
    for index in count(1):
        yield f"x{index}"


def requirements_of(selector: LabelSelector) -> list[SelectorRequirement]:
    """The selector as a list of requirements; ``matchLabels {k: v}`` becomes ``k In (v)``."""
    return [
        *(SelectorRequirement(key, "In", (value,)) for key, value in selector.match_labels.items()),
        *selector.match_expressions,
    ]


def common_pod_labels(*selectors: LabelSelector) -> dict[str, str] | None:
    """Labels of a pod that every selector selects, or None when no pod can match them all.

    The example is minimal: it sets only the keys some requirement demands. With no
    selector, or only empty ones, it is ``{}`` (a pod with no labels matches).
    """
    constraints: dict[str, _KeyConstraint] = {}
    for selector in selectors:
        for requirement in requirements_of(selector):
            constraints.setdefault(requirement.key, _KeyConstraint()).add(requirement)
    labels: dict[str, str] = {}
    for key, constraint in constraints.items():
        value = constraint.example_value()
        if value is None:
            return None
        if constraint.present:
            labels[key] = value
    return labels


def selectors_may_overlap(first: LabelSelector, second: LabelSelector) -> bool:
    """True when some pod could be selected by both ``first`` and ``second``.

    Exact for In, NotIn, Exists and DoesNotExist; an unknown operator makes the answer
    lean to True (see the module docstring).
    """
    return common_pod_labels(first, second) is not None


def describe_labels(labels: Mapping[str, str], max_labels: int = 3) -> str:
    """``a pod labelled app=llama, tier=canary``: an example label set, for messages."""
    if not labels:
        return "a pod with no labels"
    parts = [f"{key}={value}" for key, value in sorted(labels.items())]
    shown = ", ".join(parts[:max_labels]) + (f" and {len(parts) - max_labels} more" if len(parts) > max_labels else "")
    return f"a pod labelled {shown}"
