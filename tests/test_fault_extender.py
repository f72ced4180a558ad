"""The extender program (``powercap extender``, a subprocess) on the fake API server, with the
pod cache it has in a cluster (bound pods only): two pods of a service whose budget has one
free GPU minimum, filtered back to back before either is bound, must not both pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.agenthelpers import wait_until, write_kubeconfig
from tests.e2e.harness import free_port
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.objects import gpu_node, gpu_pod, policy, telemetry

LLAMA = {"app.kubernetes.io/name": "llama"}
MIN_W = 200


def filter_call(url: str, pod: dict[str, Any], nodes: list[str]) -> dict[str, Any]:
    body = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": nodes}).encode()
    request = urllib.request.Request(f"{url}/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        document: dict[str, Any] = json.loads(answer.read())
        return document


@pytest.fixture
def extender(tmp_path: Path) -> Iterator[tuple[str, FakeApiServer]]:
    now = datetime.now(timezone.utc)
    with FakeApiServer() as server:
        pods = [f"inference/llama-{i}" for i in range(4)]
        server.put_object("nodes", {"apiVersion": "v1", "kind": "Node",
                                    **gpu_node("gpu-1", "rack-1", telemetry(1700, at=now, pods=pods))})
        for i in range(4):
            server.put_object("pods", {"apiVersion": "v1", "kind": "Pod", **gpu_pod(
                f"llama-{i}", labels=LLAMA, node="gpu-1", bound_at=now - timedelta(minutes=10))})
        # budget 1940 W (2000 W less 3 %); 1740 W allocated: room for one more GPU's 200 W minimum
        document = policy("llama", cap_w=2000)
        gpus = [{"uuid": f"GPU-{i}", "watts": w} for i, w in enumerate((485, 485, 385, 385))]
        document["status"] = {"allocations": [{"node": "gpu-1", "gpus": gpus, "watts": 1740}]}
        server.put_object("powercappingpolicies", document)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", server.url))}
        process = subprocess.Popen([str(Path(sys.executable).parent / "powercap"), "extender", "--bind", f"127.0.0.1:{port}"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
                    return answer.status == 200
            except OSError:
                return process.poll() is not None

        try:
            wait_until(ready, 30)
            assert process.poll() is None, "the extender exited"
            yield url, server
        finally:
            process.terminate()
            process.wait(15)


def test_pods_let_through_back_to_back_do_not_share_one_free_minimum(extender: tuple[str, FakeApiServer]) -> None:
    url, _ = extender
    first = filter_call(url, gpu_pod("llama-4", labels=LLAMA), ["gpu-1"])
    assert first["NodeNames"] == ["gpu-1"], first
    second = filter_call(url, gpu_pod("llama-5", labels=LLAMA), ["gpu-1"])
    assert second["NodeNames"] == [] and not second["FailedAndUnresolvableNodes"], second
    reason = second["FailedNodes"]["gpu-1"]
    assert reason.startswith("policy inference/llama has no budget free for this pod yet: 1740 W allocated + "
                             f"{MIN_W} W for pods placed a moment ago + 1 x {MIN_W} W minimum"), reason
