"""Builders shared by the node agent tests: policies with allocations, pods, a static
policy source and a publisher that records what it was asked to send."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from nodeagent.sources import SourceView
from powercap.policies import Policy, parse_policy
from powercap.telemetry import NodeTelemetry

NODE = "gpu-node-1"


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
    events: list[tuple[str, str, str, str]] = field(default_factory=list)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def telemetry(self, telemetry: NodeTelemetry, now_s: float) -> None:
        self.telemetries.append(telemetry)

    def event(self, policy: Policy, reason: str, note: str, event_type: str, now_s: float) -> None:
        self.events.append((policy.key, reason, event_type, note))

    def reasons(self) -> list[str]:
        return [reason for _, reason, _, _ in self.events]
