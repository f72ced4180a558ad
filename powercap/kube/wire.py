"""The JSON shapes and time formats of the Kubernetes API, as powercap handles them.

Objects are plain JSON dicts exactly as the API server sends them (no generated model
classes). Times on the wire are RFC 3339 strings; in Python they are float seconds since
the epoch (``*_s``), read from an injectable clock where the timing matters.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Literal

from powercap.telemetry import parse_rfc3339

JsonObject = dict[str, Any]
"""A Kubernetes object, list or Status as decoded JSON."""
Params = Mapping[str, str | int | bool | None]
"""Query parameters; ``None`` values are left out, booleans become ``true``/``false``."""
PatchType = Literal["merge", "json", "strategic"]
WatchListener = Callable[[str, JsonObject], None]
Clock = Callable[[], float]
"""Returns the wall-clock time in seconds since the epoch (``time.time``)."""


def format_micro_time(t_s: float) -> str:
    """Format epoch seconds as a Kubernetes MicroTime: ``2026-11-27T23:19:01.123456Z``."""
    return dt.datetime.fromtimestamp(t_s, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> float:
    """Parse an RFC 3339 Time or MicroTime (``...Z`` or ``...+00:00``) to epoch seconds.

    Raises ``ValueError`` on anything else.
    """
    parsed = parse_rfc3339(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()
