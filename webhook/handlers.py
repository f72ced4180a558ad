"""Admission rules for PowerCappingPolicy, in controller-runtime's shape.

:class:`PolicyAdmission` is the user-facing half: ``validate_create``, ``validate_update``,
``validate_delete`` (each returns the core :class:`ValidationResult`: errors refuse the
object, warnings are shown by kubectl) and ``default``. The rules are the core's:
``validate_policy`` and ``default_policy`` give the same messages as ``powercap validate``;
``find_conflicts`` adds the checks against the other policies.

``review_validation`` and ``review_mutation`` are the adapter: given a decoded request
they dispatch on the operation and return a :class:`Verdict`; ``reviews.build_response``
turns it into the AdmissionReview reply.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from powercap import API_GROUP, KIND
from powercap.algorithms import AlgorithmRegistry
from powercap.conflicts import find_conflicts
from powercap.policies import default_policy, policy_from_valid, validate_policy
from powercap.problems import Problem, ValidationResult
from webhook.lookups import PolicyLookup, PolicySourceUnavailable
from webhook.patches import diff
from webhook.reviews import Request, Verdict

CROSS_CHECKS_SKIPPED = "cross-policy checks skipped"


class PolicyAdmission:
    """Validation and defaulting of PowerCappingPolicy objects.

    ``policies`` gives the other policies of the cluster for the cross-policy checks; None
    turns those checks off (``powercap webhook --no-cross-policy-checks``). When it cannot
    answer, the checks become a warning: the webhook never refuses a policy because the
    API server is unreachable.
    """

    def __init__(self, registry: AlgorithmRegistry, policies: PolicyLookup | None = None) -> None:
        self.registry = registry
        self.policies = policies

    def validate_create(self, obj: Any) -> ValidationResult:
        result = validate_policy(obj, self.registry)
        if not result.ok:
            return result
        return _merge(result, self._cross_check(obj, selector_changed=True))

    def validate_update(self, old: Any, new: Any) -> ValidationResult:
        """Like create, with two allowances so that an update never gets stuck:

        - an object being deleted (``metadata.deletionTimestamp``) is allowed, so that
          finalizers can always be removed;
        - an overlap with another policy that the update does not cause (the selector is
          unchanged) is a warning, so that an existing policy can still be edited.
        """
        if _being_deleted(new):
            return ValidationResult()
        result = validate_policy(new, self.registry)
        if not result.ok:
            return result
        selector_changed = _effective_selector(old, self.registry) != _effective_selector(new, self.registry)
        return _merge(result, self._cross_check(new, selector_changed=selector_changed))

    def validate_delete(self, old: Any) -> ValidationResult:
        """Deleting a policy is always allowed."""
        return ValidationResult()

    def default(self, obj: Any) -> Any:
        """``obj`` with the core defaults; metadata and status are never touched."""
        if not isinstance(obj, dict):
            return obj
        defaulted = default_policy(obj, self.registry)
        for untouched in ("metadata", "status"):
            if untouched in obj:
                defaulted[untouched] = copy.deepcopy(obj[untouched])
            else:
                defaulted.pop(untouched, None)
        return defaulted

    def _cross_check(self, valid_document: Mapping[str, Any], *, selector_changed: bool) -> ValidationResult:
        if self.policies is None:
            return ValidationResult()
        try:
            others = self.policies.policies()
        except PolicySourceUnavailable as error:
            return ValidationResult(warnings=(Problem("", f"{CROSS_CHECKS_SKIPPED}: {error}"),))
        candidate = policy_from_valid(default_policy(valid_document, self.registry))
        return find_conflicts(candidate, others, selector_changed=selector_changed)


def _merge(first: ValidationResult, second: ValidationResult) -> ValidationResult:
    return ValidationResult(errors=first.errors + second.errors, warnings=first.warnings + second.warnings)


def _being_deleted(obj: Any) -> bool:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    return isinstance(metadata, dict) and bool(metadata.get("deletionTimestamp"))


def _effective_selector(obj: Any, registry: AlgorithmRegistry) -> Any:
    if not isinstance(obj, dict):
        return None
    spec = default_policy(obj, registry).get("spec")
    return spec.get("selector") if isinstance(spec, dict) else None


def is_policy_request(request: Request) -> bool:
    """True for the main resource of a PowerCappingPolicy, which is all this webhook judges.

    Anything else (a status subresource, another kind sent by a misconfigured webhook
    configuration) is allowed untouched: the webhook must never block what it does not own.
    """
    return request.kind["group"] == API_GROUP and request.kind["kind"] == KIND and not request.sub_resource


def with_request_namespace(obj: Any, namespace: str) -> Any:
    """``obj`` with ``metadata.namespace`` filled in from the request when the object lacks it."""
    if not namespace or not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return obj
    if obj["metadata"].get("namespace"):
        return obj
    return {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}


def review_validation(request: Request, admission: PolicyAdmission) -> Verdict:
    """Dispatch a validation request: CREATE and UPDATE are checked, DELETE and CONNECT allowed.

    ``dryRun`` requests are judged exactly like real ones.
    """
    if not is_policy_request(request):
        return Verdict()
    new = with_request_namespace(request.object, request.namespace)
    if request.operation == "CREATE":
        result = admission.validate_create(new)
    elif request.operation == "UPDATE":
        result = admission.validate_update(with_request_namespace(request.old_object, request.namespace), new)
    elif request.operation == "DELETE":
        result = admission.validate_delete(request.old_object)
    else:
        return Verdict()
    warnings = tuple(str(warning) for warning in result.warnings)
    if not result.ok:
        return Verdict.deny(result.errors, warnings)
    return Verdict(warnings=warnings)


def review_mutation(request: Request, admission: PolicyAdmission) -> Verdict:
    """Default CREATE and UPDATE objects: the patch is the diff of the object before and after.

    An already-defaulted object yields no patch. A mutation never refuses anything: invalid
    objects get what defaults apply and are refused by the validating webhook.
    """
    if not is_policy_request(request) or request.operation not in ("CREATE", "UPDATE"):
        return Verdict()
    if _being_deleted(request.object):
        return Verdict()
    return Verdict(patch=diff(request.object, admission.default(request.object)))
