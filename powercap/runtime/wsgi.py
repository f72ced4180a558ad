"""Gunicorn configured in code, for the programs that serve HTTP through Flask (webhook,
extender), with one logging set-up: every logger, gunicorn's own included, writes JSON
lines to stderr (:class:`powercap.runtime.logs.JsonFormatter`); no access log (each
program counts its requests in metrics and logs what matters itself).

The worker is :class:`powercap.runtime.httpworker.BufferingWorker`: requests are received
whole by an event loop before a thread runs them, so slow or idle clients hold no thread
(that module's docstring gives the design and its bounds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from powercap.runtime.httpworker import ConnectionLimits, worker_class


def logging_config(level: str) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: JSON lines on stderr at ``level``; gunicorn's access log off."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "powercap.runtime.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }


class GunicornServer(BaseApplication):  # type: ignore[misc]  # gunicorn is untyped
    """Gunicorn with ``settings`` (gunicorn's names) over the common ones below.

    ``load_app`` runs in each worker after the fork, so threads it starts (watch caches)
    belong to the worker. Common settings: the buffering worker with ``limits``, JSON logs
    at ``log_level``, no access log, no ``X-Forwarded-*`` trust, and no control socket
    (gunicorn >= 25 would otherwise open one in ``$HOME``, which a read-only root
    filesystem refuses and which no one here uses).
    """

    def __init__(self, settings: Mapping[str, Any], load_app: Callable[[], Flask], log_level: str = "info",
                 *, limits: ConnectionLimits) -> None:
        self._settings = dict(settings)
        self._load_app = load_app
        self._log_level = log_level
        self.limits = limits
        super().__init__()

    def load_config(self) -> None:
        settings: dict[str, Any] = {
            "worker_class": worker_class(self.limits),
            "accesslog": None,
            "errorlog": "-",
            "logconfig_dict": logging_config(self._log_level),
            "forwarded_allow_ips": "",
            **self._settings,
        }
        if "control_socket_disable" in self.cfg.settings:
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._load_app()
