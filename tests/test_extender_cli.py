"""``powercap extender`` as a user runs it: flags, start-up errors, and a real gunicorn server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from powercap.commands import main
from tests.fakes.objects import extender_args, gpu_node, gpu_pod, kubectl_list, policy, telemetry

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--bind", "8888"], "argument --bind: '8888' is not HOST:PORT", id="bind"),
        pytest.param(["--stale-after", "0"], "argument --stale-after: '0' must be a positive number of seconds", id="stale-after"),
        pytest.param(["--rack-label", "Not A Label"], "argument --rack-label: label key", id="rack-label"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["extender", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_state_file_at_start_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "snapshot.yaml"
    path.write_text("kind: List\nitems: [{kind: Pod}]\n")
    assert main(["extender", "--cluster-state", str(path)]) == 2
    assert capsys.readouterr().err == f"powercap extender: error: {path}: item 1 (Pod) has no metadata.name\n"


def test_no_cluster_and_no_state_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["extender"]) == 2
    assert "run with --cluster-state FILE to replay a snapshot without a cluster" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_server_answers_kube_scheduler_on_a_snapshot(tmp_path: Path) -> None:
    nodes = [gpu_node("gpu-1", "rack-1", telemetry(4800)), gpu_node("gpu-2", "rack-2", telemetry(1000))]
    racks = [{"rackId": "rack-1", "maxPower": 5000}, {"rackId": "rack-2", "maxPower": 5000}]
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.dump(kubectl_list(nodes, [], [policy("llama", racks=racks)]), Dumper=yaml.CSafeDumper))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "powercap", "extender", "--cluster-state", str(path), "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1) as ready:
                    assert ready.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "the extender did not become ready"
                time.sleep(0.1)
        body = extender_args(gpu_pod("llama-0", gpus=1, power_watts="700"), nodes, node_cache_capable=True)
        request = urllib.request.Request(f"{base}/filter", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            result = json.load(response)
        assert result["NodeNames"] == ["gpu-2"]
        assert result["FailedNodes"] == {
            "gpu-1": "rack-1: 4800 W in use + 700 W for this pod > maxPower 5000 W (set by policy inference/llama)"
        }
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=15)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("cluster view loaded from") for line in lines), output
    assert any(line.get("message") == "filter inference/llama-0: 1 of 2 nodes passed" and line.get("passed") == 1 for line in lines), output
    assert server.returncode == 0


def test_kustomize_builds_the_scheduler_wiring_offline() -> None:
    kubectl = "/usr/bin/kubectl" if os.path.exists("/usr/bin/kubectl") else "kubectl"
    try:
        built = subprocess.run([kubectl, "kustomize", str(ROOT / "config" / "scheduler")], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("kubectl is not installed")
    assert built.returncode == 0, built.stderr
    documents = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    deployment = documents[("Deployment", "power-aware-scheduler")]
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"kube-scheduler", "extender"}
    assert "--bind=127.0.0.1:8888" in containers["extender"]["args"]
    config_map = next(d for (kind, _), d in documents.items() if kind == "ConfigMap" and "scheduler-config.yaml" in d.get("data", {}))
    configuration = yaml.safe_load(config_map["data"]["scheduler-config.yaml"])
    assert configuration["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert configuration["profiles"][0]["schedulerName"] == "power-aware-scheduler"
    assert configuration["leaderElection"]["leaderElect"] is True
    extender = configuration["extenders"][0]
    assert extender["urlPrefix"] == "http://127.0.0.1:8888"
    assert extender["nodeCacheCapable"] is True
    assert extender["managedResources"] == [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}]
    kinds = {kind for kind, _ in documents}
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "RoleBinding"} <= kinds


def test_the_default_scheduler_stanza_matches_the_second_schedulers() -> None:
    scheduler_dir = ROOT / "config" / "scheduler"
    second = yaml.safe_load((scheduler_dir / "scheduler-config.yaml").read_text())
    stanza = yaml.safe_load((scheduler_dir / "default-scheduler-extender.yaml").read_text())
    assert stanza["extenders"] == second["extenders"]
    assert stanza["extenders"][0]["httpTimeout"] == "5s" and stanza["extenders"][0]["ignorable"] is False


def test_metrics_bind_serves_metrics_and_probes_only(tmp_path: Path) -> None:
    """kube-scheduler's address stays on loopback; Prometheus scrapes --metrics-bind, where
    nothing can place a pod."""
    import requests

    from tests.webhook_helpers import ExtenderProcess

    nodes = [gpu_node("gpu-1", "rack-1", telemetry(4800)), gpu_node("gpu-2", "rack-2", telemetry(1000))]
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump(kubectl_list(nodes, [], [policy("llama")])))
    metrics_port = free_port()
    server = ExtenderProcess(path, tmp_path / "extender.log", "--metrics-bind", f"127.0.0.1:{metrics_port}")
    body = extender_args(gpu_pod("llama-0", gpus=1), nodes, node_cache_capable=True)
    try:
        with requests.Session() as session:
            session.trust_env = False
            metrics = f"http://127.0.0.1:{metrics_port}"
            assert session.post(f"{server.base_url}/filter", data=body, timeout=5).status_code == 200
            scraped = session.get(f"{metrics}/metrics", timeout=5)
            assert scraped.status_code == 200
            assert 'powercap_extender_requests_total{outcome="ok",verb="filter"} 1.0' in scraped.text
            assert session.get(f"{metrics}/readyz", timeout=5).status_code == 200
            assert session.get(f"{metrics}/healthz", timeout=5).status_code == 200
            refused = session.post(f"{metrics}/filter", data=body, timeout=5)
            assert refused.status_code == 404
            assert refused.json() == {"Error": "404 Not Found: this address serves /metrics, /healthz and /readyz only"}
            assert session.post(f"{metrics}/prioritize", data=body, timeout=5).status_code == 404
    finally:
        server.stop()
