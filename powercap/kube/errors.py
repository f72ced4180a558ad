"""The errors a Kubernetes API call raises: :class:`ApiError` and its subclasses.

Callers only ever see these, never urllib3 or kubernetes exceptions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from powercap.kube.wire import Params

# A Retry-After (429, 503) is honoured up to this; a bigger one would leave a cache stale
# for longer than any backoff of ours.
MAX_RETRY_AFTER_S = 60.0


class ApiError(Exception):
    """A request to the API server failed.

    ``code`` is the HTTP status (0 when no response came back), ``reason`` the
    Kubernetes ``Status.reason`` (``NotFound``, ``Conflict``, ``AlreadyExists``,
    ``Expired``, ...), ``message`` the human-readable ``Status.message``, ``details``
    the ``Status.details`` object (may be empty), ``retry_after_s`` the server's advice
    from the ``Retry-After`` header or ``details.retryAfterSeconds`` (None without).
    """

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details: Mapping[str, Any] = details or {}
        self.retry_after_s = retry_after_s
        self.request: RequestFacts | None = None

    def __str__(self) -> str:
        text = f"{self.code} {self.reason}: {self.message}"
        hint = self.permission_hint
        return f"{text} ({hint})" if hint else text

    @property
    def denied(self) -> bool:
        """401 or 403: a deployment mistake (credentials, RBAC), not a passing fault."""
        return self.code in (401, 403)

    @property
    def log_level(self) -> int:
        """ERROR when :attr:`denied` (nothing heals it but the operator), else WARNING."""
        return logging.ERROR if self.denied else logging.WARNING

    @property
    def permission_hint(self) -> str:
        """For a 401 or 403 of a request we sent: what the operator must fix, naming the
        verb and the resource ("" otherwise). A 403 message of the RBAC authorizer names
        them too, but a 401, or a 403 from a webhook authorizer or a proxy, does not."""
        if self.request is None or not self.denied:
            return ""
        if self.code == 401:
            return (f"the API server did not accept our credentials to {self.request.describe()}: "
                    "the service account token is missing, expired or revoked")
        return f"missing RBAC permission: {self.request.describe()}"


class RequestFacts:
    """What a request did, in RBAC's words: ``verb`` (get, list, watch, create, update,
    patch, delete), ``resource`` (``pods``, ``pods/eviction``), ``api_group`` ("" for the
    core group) and ``namespace`` (None at the cluster scope)."""

    __slots__ = ("verb", "resource", "api_group", "namespace")

    def __init__(self, verb: str, resource: str, api_group: str, namespace: str | None) -> None:
        self.verb, self.resource, self.api_group, self.namespace = verb, resource, api_group, namespace

    @classmethod
    def of(cls, method: str, path: str, params: Params | None) -> RequestFacts | None:
        """The facts of ``method path``, or None for a path that names no resource."""
        parts = [p for p in path.split("?")[0].strip("/").split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest:
            return None
        plural, name = rest[0], rest[1] if len(rest) > 1 else None
        resource = plural + (f"/{rest[2]}" if len(rest) > 2 else "")
        watching = str((params or {}).get("watch")).lower() in ("true", "1")
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
        if method == "GET" and name is None:
            verb = "watch" if watching else "list"
        elif method == "DELETE" and name is None:
            verb = "deletecollection"
        return cls(verb, resource, group, namespace)

    def describe(self) -> str:
        """``list pods in API group "" at the cluster scope`` (the RBAC rule to grant)."""
        scope = f'in namespace "{self.namespace}"' if self.namespace else "at the cluster scope"
        return f'{self.verb} {self.resource} in API group "{self.api_group}" {scope}'


class NotFound(ApiError):
    """404: the object (or the resource type) does not exist."""


class Conflict(ApiError):
    """409: a stale resourceVersion on write (reason ``Conflict``) or a create of a name
    that exists (reason ``AlreadyExists``)."""


class Gone(ApiError):
    """410: the requested resourceVersion (or continue token) is too old: list again."""


class TooManyRequests(ApiError):
    """429: throttled (see ``retry_after_s``), or an eviction that a
    PodDisruptionBudget forbids for now."""


class Unreachable(ApiError):
    """No HTTP response: connection refused or reset, TLS failure, or a timeout.

    ``code`` is 0 and ``reason`` is ``Unreachable``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(0, "Unreachable", message)


class KubeConfigError(Exception):
    """Neither an in-cluster service account nor a usable kubeconfig was found."""


_ERRORS_BY_CODE: dict[int, type[ApiError]] = {
    404: NotFound,
    409: Conflict,
    410: Gone,
    429: TooManyRequests,
}


def error_from_status(
    status: Mapping[str, Any],
    http_status: int = 0,
    retry_after_s: float | None = None,
) -> ApiError:
    """Build the exception matching a Kubernetes ``Status`` object.

    The code is ``status.code`` when present, else ``http_status``. Use it on the object
    of a watch ``ERROR`` event: ``raise error_from_status(obj)``.
    """
    code = int(status.get("code") or http_status or 0)
    reason = str(status.get("reason") or "Unknown")
    message = str(status.get("message") or "")
    details = status.get("details") or {}
    if retry_after_s is None and details.get("retryAfterSeconds"):
        retry_after_s = float(details["retryAfterSeconds"])
    error_type = _ERRORS_BY_CODE.get(code, ApiError)
    return error_type(code, reason, message, details=details, retry_after_s=retry_after_s)


def error_from_response(http_status: int, http_reason: str, body: bytes, retry_after: str | None) -> ApiError:
    retry_after_s: float | None = None
    if retry_after:
        try:
            retry_after_s = float(retry_after)
        except ValueError:
            retry_after_s = None
    try:
        status = json.loads(body) if body else {}
    except ValueError:
        status = {}
    if not isinstance(status, dict) or status.get("kind") != "Status":
        text = body.decode("utf-8", "replace").strip()[:500]
        status = {"reason": http_reason or "Unknown", "message": text or http_reason}
    return error_from_status(status, http_status, retry_after_s)
