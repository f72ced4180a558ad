"""powercap.runtime.logs: one JSON object per log line."""

from __future__ import annotations

import json
import logging
import sys

from powercap.runtime.logs import JsonFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("test.logs")
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, (), None, extra=extra)


def test_a_line_carries_extras_and_fields_with_reserved_names() -> None:
    line = json.loads(JsonFormatter().format(record(
        "watch failed", cache="powercappingpolicies", code=503, fields={"name": "llama", "namespace": "inference"},
    )))
    assert line.pop("time").endswith("+00:00")
    assert line == {
        "level": "warning", "logger": "test.logs", "message": "watch failed",
        "cache": "powercappingpolicies", "code": 503, "name": "llama", "namespace": "inference",
    }


def test_exceptions_are_one_escaped_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logger = logging.getLogger("test.logs")
        text = JsonFormatter().format(logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info()))
    assert "\n" not in text
    assert json.loads(text)["exception"].endswith("ValueError: boom")
