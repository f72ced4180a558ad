"""Checks between policies: what one policy means next to the others in the cluster.

``find_conflicts(candidate, others)`` is pure: the caller supplies the other policies
(the webhook reads them from a watch-backed cache). Two rules:

- **Overlapping selectors (error).** Two policies in one namespace whose selectors may
  select a common pod (:func:`powercap.selectors.common_pod_labels`) would give that pod two
  power budgets. The candidate is refused, naming the other policy and an example pod.
  When the candidate's selector is unchanged (an UPDATE of a policy that already
  overlapped, say from before the webhook was installed), the overlap is only a warning,
  so that the policy can still be edited.
- **One rack, different limits (warning).** Racks are physical and cluster-wide, so any
  other policy, in any namespace, naming the same ``rackId`` with a different ``maxPower``
  or ``maxTemperature`` is reported; the strictest limit applies (DESIGN.md section 4).

The candidate itself (same namespace and name, e.g. the stored copy during an UPDATE) is
never compared with itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from powercap.policies import Policy, RackConstraint
from powercap.problems import Problem, ValidationResult, join_path
from powercap.selectors import common_pod_labels, describe_labels


def find_conflicts(candidate: Policy, others: Iterable[Policy], *, selector_changed: bool = True) -> ValidationResult:
    """Errors (overlapping selectors) and warnings (rack limits) of ``candidate`` against ``others``.

    ``selector_changed`` False turns overlap errors into warnings (see the module docstring).
    """
    errors: list[Problem] = []
    warnings: list[Problem] = []
    differing_by_rack: dict[int, list[tuple[Policy, RackConstraint]]] = {}
    for other in sorted(others, key=lambda p: (p.namespace, p.name)):
        if other.key == candidate.key:
            continue
        same_namespace = other.namespace == candidate.namespace
        labels = common_pod_labels(candidate.selector, other.selector) if same_namespace else None
        if labels is not None and selector_changed:
            errors.append(Problem(
                "spec.selector",
                f'may select the same pods as PowerCappingPolicy "{other.name}" in this namespace '
                f"(e.g. {describe_labels(labels)}); a pod can follow one policy only",
            ))
        elif labels is not None:
            warnings.append(Problem(
                "spec.selector", f'already overlaps PowerCappingPolicy "{other.name}"; a pod can follow one policy only'
            ))
        for index, rack in enumerate(candidate.racks):
            theirs = other.rack(rack.rack_id)
            if theirs is not None and _limits(theirs) != _limits(rack):
                differing_by_rack.setdefault(index, []).append((other, theirs))
    warnings += [
        _rack_warning(index, candidate.racks[index], differing)
        for index, differing in sorted(differing_by_rack.items())
    ]
    return ValidationResult(errors=tuple(errors), warnings=tuple(warnings))


def _limits(rack: RackConstraint) -> tuple[int | None, float | None]:
    return rack.max_power_w, rack.max_temperature_c


def _rack_warning(index: int, rack: RackConstraint, differing: list[tuple[Policy, RackConstraint]]) -> Problem:
    other, theirs = differing[0]
    more = f" and {len(differing) - 1} more" if len(differing) > 1 else ""
    return Problem(
        join_path("spec.rackConstraints", index),
        f"{other.key}{more} limits {rack.rack_id} to {describe_limits(theirs)}; the strictest applies",
    )


def describe_limits(rack: RackConstraint) -> str:
    """``4000 W, 28 °C``; ``no limit`` when the rack sets neither."""
    parts = []
    if rack.max_power_w is not None:
        parts.append(f"{rack.max_power_w} W")
    if rack.max_temperature_c is not None:
        parts.append(f"{rack.max_temperature_c:g} °C")
    return ", ".join(parts) or "no limit"
