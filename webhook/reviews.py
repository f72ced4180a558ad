"""The AdmissionReview wire format (``admission.k8s.io/v1``), typed once.

kube-apiserver POSTs an AdmissionReview whose ``request`` carries the object under review;
we answer with the same ``apiVersion``/``kind`` and a ``response`` whose ``uid`` is the
request's. Reference: k8s.io/api/admission/v1/types.go.

Two error families, as in kopf: :class:`BadRequest` means the *request* is not something
we can answer (HTTP 400, never an AdmissionReview), while a bad *object* under review is
answered normally with ``allowed: false`` (:class:`Verdict`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import msgspec

from powercap.problems import Problem

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
MAX_WARNING_CHARS = 120
# metav1.Status for a refused object; kubectl prints the causes one per line.
DENIAL_CODE = 422
DENIAL_REASON = "Invalid"
CAUSE_REASON = "FieldValueInvalid"

Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class GroupVersionResource(TypedDict):
    group: str
    version: str
    resource: str


class UserInfo(TypedDict, total=False):
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]]


# ``RequestPayload`` spells field names the way the apiserver does, so it uses the
# functional TypedDict syntax (``object`` is a builtin).
RequestPayload = TypedDict("RequestPayload", {
    "uid": str,
    "kind": GroupVersionKind,
    "resource": GroupVersionResource,
    "subResource": str,
    "requestKind": GroupVersionKind,
    "requestResource": GroupVersionResource,
    "requestSubResource": str,
    "name": str,
    "namespace": str,
    "operation": str,
    "userInfo": UserInfo,
    "object": Any,
    "oldObject": Any,
    "dryRun": bool,
    "options": Any,
}, total=False)


class StatusCause(TypedDict):
    reason: str
    field: str
    message: str


class StatusDetails(TypedDict, total=False):
    name: str
    group: str
    kind: str
    causes: list[StatusCause]


class StatusPayload(TypedDict, total=False):
    status: str
    code: int
    reason: str
    message: str
    details: StatusDetails


class ResponsePayload(TypedDict, total=False):
    uid: str
    allowed: bool
    status: StatusPayload
    warnings: list[str]
    patchType: str
    patch: str
    auditAnnotations: dict[str, str]


class AdmissionReviewPayload(TypedDict, total=False):
    apiVersion: str
    kind: str
    request: RequestPayload
    response: ResponsePayload


class BadRequest(Exception):
    """The body is not an AdmissionReview we can answer: HTTP 400 with this short message."""


@dataclass(frozen=True)
class Request:
    """The fields of an AdmissionReview request the handlers use, checked for type."""

    uid: str
    operation: Operation
    kind: GroupVersionKind
    name: str = ""
    namespace: str = ""
    sub_resource: str = ""
    username: str = ""
    object: Any = None
    old_object: Any = None
    dry_run: bool = False


@dataclass(frozen=True)
class Verdict:
    """What a handler decided about one request.

    ``problems`` are the reasons of a refusal (``allowed`` False), each with its field path.
    ``patch`` is an RFC 6902 JSON Patch (a list of operations), None or empty for no change.
    ``code`` and ``reason`` are the refusal's ``status``: 422 ``Invalid`` for a bad object,
    400 ``BadRequest`` or 413 ``RequestEntityTooLarge`` for a request past the webhook's
    limits (see :meth:`refuse_request`).
    """

    allowed: bool = True
    problems: tuple[Problem, ...] = ()
    warnings: tuple[str, ...] = ()
    patch: Sequence[Mapping[str, Any]] | None = None
    code: int = DENIAL_CODE
    reason: str = DENIAL_REASON

    @classmethod
    def deny(cls, problems: Sequence[Problem], warnings: Sequence[str] = ()) -> Verdict:
        return cls(allowed=False, problems=tuple(problems), warnings=tuple(warnings))

    @classmethod
    def refuse_request(cls, message: str, *, too_large: bool = False) -> Verdict:
        """A refusal of the request as a whole (no field path): 413 when ``too_large``, else 400."""
        code, reason = (413, "RequestEntityTooLarge") if too_large else (400, "BadRequest")
        return cls(allowed=False, problems=(Problem("", message),), code=code, reason=reason)


def decode_review(body: bytes) -> Request:
    """Parse and check an AdmissionReview request body; raise :class:`BadRequest` if it is not one.

    The body's shape must have been checked first (``powercap.runtime.jsonlimits``): this
    decodes all of it.
    """
    try:
        review = json.loads(body, parse_constant=_reject_constant)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, too many digits, NaN
        raise BadRequest(f"request body is not JSON: {_short(error)}") from None
    except RecursionError:
        raise BadRequest("request body is not JSON: nested too deeply") from None
    return review_from_document(review)


class _EnvelopeKind(msgspec.Struct):
    group: str | None = None
    version: str | None = None
    kind: str | None = None


class _EnvelopeUser(msgspec.Struct):
    username: str | None = None


class _EnvelopeRequest(msgspec.Struct, rename={"sub_resource": "subResource", "user_info": "userInfo", "dry_run": "dryRun"}):
    uid: str | None = None
    kind: _EnvelopeKind | None = None
    name: str | None = None
    namespace: str | None = None
    sub_resource: str | None = None
    operation: str | None = None
    user_info: _EnvelopeUser | None = None
    dry_run: bool | None = None


class _Envelope(msgspec.Struct, rename={"api_version": "apiVersion"}):
    api_version: str | None = None
    kind: str | None = None
    request: _EnvelopeRequest | None = None


_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)


def decode_envelope(body: bytes) -> Request:
    """The request of an AdmissionReview without its ``object`` and ``oldObject``, which
    are skipped, never decoded: to answer a body too large or too deep to be decoded
    whole. :class:`BadRequest` when it is not an AdmissionReview (or nests too deeply for
    even that, about a thousand levels)."""
    try:
        envelope = _ENVELOPE_DECODER.decode(body)
    except msgspec.ValidationError as error:
        raise BadRequest(f"request body is not an AdmissionReview: {_short(error)}") from None
    except msgspec.DecodeError as error:
        raise BadRequest(f"request body is not JSON: {_short(error)}") from None
    except RecursionError:
        raise BadRequest("request body is not JSON: nested too deeply") from None
    document: dict[str, Any] = {"apiVersion": envelope.api_version, "kind": envelope.kind}
    if envelope.request is not None:
        request = envelope.request
        fields = {
            "uid": request.uid, "name": request.name, "namespace": request.namespace,
            "subResource": request.sub_resource, "operation": request.operation,
            "dryRun": False if request.dry_run is None else request.dry_run,
            "kind": None if request.kind is None else msgspec.structs.asdict(request.kind),
            "userInfo": {"username": request.user_info.username} if request.user_info is not None else None,
        }
        document["request"] = {key: value for key, value in fields.items() if value is not None}
    return review_from_document(document)


def review_from_document(review: Any) -> Request:
    """Check a decoded AdmissionReview; raise :class:`BadRequest` if it is not one."""
    if not isinstance(review, dict):
        raise BadRequest("request body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != KIND or review.get("apiVersion") != API_VERSION:
        raise BadRequest(
            f"expected apiVersion {API_VERSION} kind {KIND}, got "
            f"apiVersion {_shown(review.get('apiVersion'))} kind {_shown(review.get('kind'))}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadRequest("AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadRequest("request.uid is missing" if uid is None else f"request.uid must be a non-empty string, not {_shown(uid)}")
    operation = request.get("operation")
    if operation not in OPERATIONS:
        raise BadRequest(f"request.operation must be one of {', '.join(OPERATIONS)}, got {_shown(operation)}")
    kind = request.get("kind")
    if not isinstance(kind, dict) or not all(isinstance(kind.get(k), str) for k in ("group", "version", "kind")):
        raise BadRequest("request.kind must be an object with group, version and kind strings")
    user_info = request.get("userInfo")
    username = user_info.get("username") if isinstance(user_info, dict) else None
    dry_run = request.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("request.dryRun must be a boolean")
    return Request(
        uid=uid,
        operation=operation,
        kind=GroupVersionKind(group=kind["group"], version=kind["version"], kind=kind["kind"]),
        name=_string_field(request, "name"),
        namespace=_string_field(request, "namespace"),
        sub_resource=_string_field(request, "subResource"),
        username=username if isinstance(username, str) else "",
        object=request.get("object"),
        old_object=request.get("oldObject"),
        dry_run=dry_run,
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _string_field(request: Mapping[str, Any], name: str) -> str:
    value = request.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"request.{name} must be a string")
    return value


def _shown(value: Any) -> str:
    if value is None:
        return "missing"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:100]


def shorten(text: str, limit: int = MAX_WARNING_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, marking the cut with '...'."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def denial_message(problems: Sequence[Problem]) -> str:
    """Every problem as ``path: message``, joined by "; " into one line.

    The apiserver prefixes it with ``admission webhook "<name>" denied the request: ``;
    clients that print the error as a string (client-go, Helm, Argo CD) show that line.
    """
    return "; ".join(str(problem) for problem in problems)


def encode_patch(operations: Sequence[Mapping[str, Any]]) -> str:
    """The ``patch`` field: base64 of the JSON Patch document."""
    return base64.b64encode(json.dumps(list(operations), separators=(",", ":")).encode()).decode("ascii")


def build_response(request: Request, verdict: Verdict) -> AdmissionReviewPayload:
    """The AdmissionReview answering ``request``: same apiVersion/kind, ``response.uid`` copied.

    A refusal carries ``status.code`` 422, ``reason: Invalid``, the joined ``message`` and
    ``details.causes`` (one per problem) so that kubectl prints every problem on its own
    line. Warnings are cut to 120 characters each, the apiserver's recommendation.
    """
    response: ResponsePayload = {"uid": request.uid, "allowed": verdict.allowed}
    if not verdict.allowed:
        details = StatusDetails(name=request.name or _object_name(request.object), group=request.kind["group"], kind=request.kind["kind"])
        if verdict.code == DENIAL_CODE:
            details["causes"] = [
                StatusCause(reason=CAUSE_REASON, field=problem.path, message=problem.message)
                for problem in verdict.problems
            ]
        response["status"] = StatusPayload(
            status="Failure",
            code=verdict.code,
            reason=verdict.reason,
            message=denial_message(verdict.problems),
            details=details,
        )
    if verdict.warnings:
        response["warnings"] = [shorten(warning) for warning in verdict.warnings]
    if verdict.allowed and verdict.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = encode_patch(verdict.patch)
    return AdmissionReviewPayload(apiVersion=API_VERSION, kind=KIND, response=response)


def _object_name(obj: Any) -> str:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) else ""
