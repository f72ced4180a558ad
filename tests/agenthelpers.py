"""Builders shared by the node agent tests: policies with allocations, pods, a static
policy source, a publisher that records what it was asked to send, ``powercap agent``
run as a process (:class:`AgentProcess`) with a kubeconfig for the fake API server, and
the value of a series picked by some of its labels (:func:`series_value`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.sources import SourceView
from powercap.policies import Policy, parse_policy
from powercap.telemetry import NodeTelemetry

NODE = "gpu-node-1"
AGENT = [sys.executable, "-m", "powercap", "agent"]


def series_value(source: CollectorRegistry | str, name: str, **labels: str) -> float | None:
    """The value of the one series ``name`` whose labels include ``labels``, from a registry
    or a scraped exposition text; None when there is none."""
    families = text_string_to_metric_families(source) if isinstance(source, str) else source.collect()
    values = [s.value for f in families for s in f.samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(values) <= 1, f"{name}{labels} picks {len(values)} series"
    return values[0] if values else None


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll ``condition`` every 10 ms; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def policy_document(name: str = "llama", cap_w: int = 2000, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "powercapping.example.com/v1alpha1",
        "kind": "PowerCappingPolicy",
        "metadata": {"name": name, "namespace": "inference", "uid": f"uid-{name}"},
        "spec": {"powerCapLimit": cap_w, **spec},
    }


def allocated(policy: Policy, caps_w: dict[str, int], node: str = NODE) -> Policy:
    """``policy`` with a status allocation on ``node``: GPU UUID -> watts."""
    entry = {"node": node, "gpus": [{"uuid": u, "watts": w} for u, w in caps_w.items()], "watts": sum(caps_w.values())}
    return replace(policy, status=MappingProxyType({"allocations": [entry]}))


def policy(name: str = "llama", caps_w: dict[str, int] | None = None, **spec: Any) -> Policy:
    parsed = parse_policy(policy_document(name, **spec))
    return allocated(parsed, caps_w) if caps_w is not None else parsed


def pod(uid: str, name: str = "llama-0", policy_name: str = "llama", **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "inference",
            "uid": uid,
            "labels": {"powercapping.example.com/policy": policy_name},
            "annotations": dict(annotations),
        },
        "spec": {"nodeName": NODE},
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    }


@dataclass
class StaticSource:
    """A policy source the test changes between ticks."""

    view_now: SourceView = field(default_factory=lambda: SourceView(fresh=True))

    def set(self, *policies: Policy, pods: dict[str, Any] | None = None, fresh: bool = True, **extra: Any) -> None:
        self.view_now = SourceView(policies=policies, pods_by_uid=pods or {}, fresh=fresh, **extra)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def view(self) -> SourceView:
        return self.view_now


@dataclass
class RecordingPublisher:
    telemetries: list[NodeTelemetry] = field(default_factory=list)
    lowered: list[bool] = field(default_factory=list)  # each telemetry's ``lowered``
    events: list[tuple[str, str, str, str]] = field(default_factory=list)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def telemetry(self, telemetry: NodeTelemetry, now_s: float, *, lowered: bool = False) -> None:
        self.telemetries.append(telemetry)
        self.lowered.append(lowered)

    def event(self, policy: Policy, reason: str, note: str, event_type: str, now_s: float) -> None:
        self.events.append((policy.key, reason, event_type, note))

    def reasons(self) -> list[str]:
        return [reason for _, reason, _, _ in self.events]


def node_object(rack: str | None = "rack-a1") -> dict[str, Any]:
    """This node (NODE) as the API server stores it, with its rack label."""
    labels = {"powercapping.example.com/rack": rack} if rack else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": labels}}


def allocation_document(name: str, caps_w: dict[str, int], node: str = NODE, **spec: Any) -> dict[str, Any]:
    """A policy document whose status allocates ``caps_w`` (GPU UUID -> W) on ``node``."""
    document = policy_document(name, **spec)
    gpus = [{"uuid": u, "watts": w} for u, w in caps_w.items()]
    document["status"] = {"allocations": [{"node": node, "gpus": gpus, "watts": sum(caps_w.values())}]}
    return document


def write_kubeconfig(path: Path, server_url: str) -> Path:
    """A kubeconfig for ``server_url`` (the fake API server), with a token it does not check."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: '{server_url}'}}}}]\n"
        "users: [{name: agent, user: {token: not-checked}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: agent}}]\n"
        "current-context: fake\n"
    )
    return path


class AgentProcess:
    """A running ``powercap agent``; its JSON log lines are collected as they come."""

    def __init__(self, command: list[str], env: dict[str, str], timeout_s: float = 15.0) -> None:
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(lambda: any(line["message"] == "agent running" for line in self.lines) or self.process.poll() is not None,
                   timeout_s)
        assert self.process.poll() is None, self.lines
        self.metrics_port = next(line["metrics_port"] for line in self.lines if line["message"] == "agent running")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def logged(self, message: str) -> list[dict[str, Any]]:
        """The log lines with this message."""
        return [line for line in list(self.lines) if line["message"] == message]

    def get(self, path: str) -> bytes:
        """GET ``/status``, ``/metrics`` or ``/healthz`` from the agent."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as response:
            body: bytes = response.read()
            return body

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.get("/status"))
        return document

    def stop(self) -> tuple[int, list[dict[str, Any]]]:
        """SIGTERM, then the exit status and every JSON log line."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=5)
        self._reader.join(5)
        return code, self.lines
