"""What kubectl prints, captured from a real cluster into README.md and docs/.

    scripts/capture-docs.sh            start a local cluster, capture, rewrite the docs, stop
    python -m tests.e2e.captures --check DIR   compare with the cluster up in DIR

A captured block in a Markdown file is the fenced block right after a marker line:

    <!-- captured: refused-by-webhook (scripts/capture-docs.sh) -->
    ```console
    $ kubectl apply -f policy.yaml
    ...
    ```

Each capture sets up what it needs in the default scenario of scripts/local-cluster.sh
and runs real commands. Outputs that hold measured watts, ages, times, UIDs and generated
pod names are *volatile*: the drift check (tests/e2e/test_captured_docs.py) masks those
before comparing, so it catches changed words, fields and layouts, not a new reading.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from powercap import KIND, kube
from powercap.policies import API_GROUP_VERSION
from tests.e2e.harness import REPO_ROOT, ControlPlane, ensure_namespace, running_controlplane, wait_until

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- captured: (?P<name>[a-z0-9-]+) \(scripts/capture-docs\.sh\) -->\n(?P<fence>```\w*\n)(?P<body>.*?)^```$",
                    re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Capture:
    name: str
    shown_command: str  # printed after "$ " above the output ("" for none)
    run: Callable[[ControlPlane], str]
    volatile: bool = False


def policy(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_GROUP_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def kubectl_output(done: Any) -> str:
    return (done.stdout + done.stderr).rstrip("\n") + "\n"


def bad_parameters() -> dict[str, Any]:
    """A policy the webhook refuses for two algorithm parameters (the schema cannot say)."""
    return policy("llama-70b-chat", "inference", {
        "powerCapLimit": 4200,
        "customAlgorithm": {"name": "energy-aware-scheduling",
                            "parameters": {"energyThreshold": 0, "migrationInterval": 10}}})


def refused_by_webhook(plane: ControlPlane) -> str:
    return kubectl_output(plane.apply([bad_parameters()], check=False))


def refused_overlap(plane: ControlPlane) -> str:
    ensure_namespace(plane, "serving")
    plane.apply([policy("llama-prod", "serving", {"powerCapLimit": 1000, "selector": {"matchLabels": {"app": "llama"}}})])
    canary = policy("llama-canary", "serving",
                    {"powerCapLimit": 400, "selector": {"matchLabels": {"app": "llama", "track": "canary"}}})
    done = plane.apply([canary], check=False)
    plane.kubectl("delete", "pcp", "llama-prod", "-n", "serving")
    return kubectl_output(done)


def refused_client_go(plane: ControlPlane) -> str:
    """The Status message a client-go based tool prints (Helm, Argo CD): through KubeClient."""
    client = kube.KubeClient.from_environment(kubeconfig=plane.kubeconfig)
    try:
        client.create(kube.policy_path("inference"), bad_parameters())
    except kube.ApiError as error:
        return f"{error.message}\n"
    finally:
        client.close()
    raise AssertionError("the policy was admitted")


def refused_too_deep(plane: ControlPlane) -> str:
    nested: dict[str, Any] = {"level": 0}
    for level in range(1, 70):
        nested = {"level": level, "inner": nested}
    document = policy("llama-70b-chat", "inference",
                      {"powerCapLimit": 4200, "customAlgorithm": {"name": "headroom", "parameters": {"deep": nested}}})
    path = plane.directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    done = plane.kubectl("create", "-f", str(path), check=False)
    return kubectl_output(done).replace(str(path), "policy.yaml")


def mistral_7b(plane: ControlPlane) -> None:
    """batch/mistral-7b: 4 one-GPU pods under 900 W, lowered to 700 W (infeasible), raised back."""
    if plane.kubectl("get", "pcp", "mistral-7b", "-n", "batch", check=False).returncode == 0:
        return
    ensure_namespace(plane, "batch")
    labels = {"app.kubernetes.io/name": "mistral-7b"}
    plane.apply([policy("mistral-7b", "batch", {"powerCapLimit": 900, "selector": {"matchLabels": labels}}), {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mistral-7b", "namespace": "batch"},
        "spec": {"replicas": 4, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"schedulerName": "power-aware-scheduler", "containers": [{
                "name": "server", "image": "vllm/vllm-openai",
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}}}])

    def condition(kind: str, status: str) -> Callable[[], bool]:
        def holds() -> bool:
            found = plane.get_json("pcp", "mistral-7b", "-n", "batch").get("status") or {}
            return any(c["type"] == kind and c["status"] == status for c in found.get("conditions") or ())
        return holds

    wait_until(condition("Enforced", "True"), 120, "mistral-7b's 4 GPUs to be enforced")
    plane.kubectl("patch", "pcp", "mistral-7b", "-n", "batch", "--type=merge", "-p", '{"spec":{"powerCapLimit":700}}')
    wait_until(condition("Feasible", "False"), 60, "mistral-7b to be infeasible at 700 W")
    plane.kubectl("patch", "pcp", "mistral-7b", "-n", "batch", "--type=merge", "-p", '{"spec":{"powerCapLimit":900}}')
    wait_until(condition("Ready", "True"), 60, "mistral-7b to be Ready again at 900 W")


def get_pcp(*args: str) -> Callable[[ControlPlane], str]:
    def run(plane: ControlPlane) -> str:
        mistral_7b(plane)
        return kubectl_output(plane.kubectl("get", "pcp", *args))
    return run


def describe_pcp(plane: ControlPlane) -> str:
    """The controller's view of batch/mistral-7b; the agents' PowerCapChanged Events on it
    (one per node and minute) left out."""
    mistral_7b(plane)
    text = kubectl_output(plane.kubectl("describe", "pcp", "-n", "batch", "mistral-7b"))
    return "".join(line for line in text.splitlines(keepends=True) if "powercapping.example.com/agent" not in line)


def pod_events(plane: ControlPlane, namespace: str, pod: str) -> str:
    """The Events part of ``kubectl describe pod``, once it has a FailedScheduling event."""
    def described() -> str | None:
        text = plane.kubectl("describe", "pod", "-n", namespace, pod).stdout
        return text if "FailedScheduling" in text else None
    text = wait_until(described, 60, f"a FailedScheduling event for {namespace}/{pod}")
    return "...\n" + text[text.index("Events:"):]


def refused_by_rack(plane: ControlPlane) -> str:
    ensure_namespace(plane, "llama")
    labels = {"app.kubernetes.io/name": "llama"}
    plane.apply([policy("llama", "llama", {"powerCapLimit": 4000, "selector": {"matchLabels": labels},
                                            "rackConstraints": [{"rackId": "rack-1", "maxPower": 1000},
                                                                {"rackId": "rack-2", "maxPower": 1200}]}), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "llama-7", "namespace": "llama", "labels": labels},
        "spec": {"schedulerName": "power-aware-scheduler", "containers": [{
            "name": "server", "image": "vllm/vllm-openai", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}])
    return pod_events(plane, "llama", "llama-7")


def refused_for_budget(plane: ControlPlane) -> str:
    """chat (4 pods of 2 GPUs, 3000 W) scaled to 6: the new pods wait for budget."""
    before = {p["metadata"]["name"] for p in plane.get_json("pods", "-n", "inference", "-l", "app.kubernetes.io/name=chat")["items"]}
    plane.kubectl("scale", "deployment", "chat", "-n", "inference", "--replicas=6")

    def refused_pod() -> str | None:
        for pod in plane.get_json("pods", "-n", "inference", "-l", "app.kubernetes.io/name=chat")["items"]:
            conditions = (pod.get("status") or {}).get("conditions") or ()
            if pod["metadata"]["name"] not in before and any(c.get("reason") == "Unschedulable" for c in conditions):
                return str(pod["metadata"]["name"])
        return None

    name = wait_until(refused_pod, 60, "a chat pod refused for budget")
    return pod_events(plane, "inference", name).replace(name, "chat-7d9f8c6b5-x2qrm")


def get_pcn(plane: ControlPlane) -> str:
    """Each GPU node's PowerCapNode, once every agent of the scenario has published."""
    def published() -> bool:
        return len([o for o in plane.get_json("powercapnodes")["items"] if o.get("status")]) == 4
    wait_until(published, 60, "every simulated agent's first PowerCapNode")
    return kubectl_output(plane.kubectl("get", "pcn"))


CAPTURES = [
    Capture("refused-by-webhook", "kubectl apply -f policy.yaml", refused_by_webhook),
    Capture("refused-overlap", "kubectl apply -f canary.yaml", refused_overlap),
    Capture("refused-client-go", "", refused_client_go),
    Capture("refused-too-deep", "kubectl create -f policy.yaml", refused_too_deep),
    Capture("get-pcp", "kubectl get pcp -A", get_pcp("-A"), volatile=True),
    Capture("get-pcn", "kubectl get pcn", get_pcn, volatile=True),
    Capture("get-pcp-wide", "kubectl get pcp -n inference -o wide", get_pcp("-n", "inference", "-o", "wide"), volatile=True),
    Capture("describe-pcp", "kubectl describe pcp -n batch mistral-7b | grep -v powercapping.example.com/agent",
            describe_pcp, volatile=True),
    Capture("refused-by-rack", "kubectl describe pod -n llama llama-7", refused_by_rack, volatile=True),
    Capture("refused-for-budget", "kubectl describe pod -n inference chat-7d9f8c6b5-x2qrm", refused_for_budget,
            volatile=True),
]
BY_NAME = {capture.name: capture for capture in CAPTURES}

_VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uid>"),
    (re.compile(r"\b(chat|code|mistral-7b)-[a-z0-9]{8,10}-[a-z0-9]{5}\b"), r"\1-<pod>"),
    (re.compile(r"\bgpu-[ab]-\d\b"), "<node>"),
    (re.compile(r" \(x\d+ over \S+\)"), ""),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
    (re.compile(r"[ \t]+"), " "),
]
# Lines whose presence is itself a reading: whether the agents' simulated GPUs overshot a cap
# for a moment while the capture ran (an OverCap Event) depends on when the rounds fell.
_TRANSIENT = re.compile(r"\bReady is False \(OverCap\)")


def normalized(capture: Capture, text: str) -> str | set[str]:
    """``text`` as the drift check compares it: as it is, or, for a volatile capture, the set
    of its lines with values, names and column padding masked (how many GPUs a node got,
    how often an Event repeated, in which order, and whether a brief overshoot was recorded are
    readings too)."""
    if not capture.volatile:
        return text
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return {line for line in text.splitlines() if not _TRANSIENT.search(line)}


def block_text(capture: Capture, output: str) -> str:
    return (f"$ {capture.shown_command}\n" if capture.shown_command else "") + output


def doc_blocks() -> Iterator[tuple[Path, str, str]]:
    """Every captured block in the docs: (file, capture name, block text)."""
    for path in DOCUMENTS:
        for match in MARKER.finditer(path.read_text()):
            yield path, match["name"], match["body"]


def capture_all(plane: ControlPlane) -> dict[str, str]:
    return {capture.name: block_text(capture, capture.run(plane)) for capture in CAPTURES}


def rewrite(outputs: dict[str, str]) -> list[Path]:
    """Write the captured outputs into their blocks; returns the files that changed."""
    changed = []
    for path in DOCUMENTS:
        text = path.read_text()

        def replace(match: re.Match[str]) -> str:
            body = outputs[match["name"]]
            return match.group(0)[: match.start("body") - match.start()] + body + "```"

        new = MARKER.sub(replace, text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    from tests.e2e import localcluster

    parser = argparse.ArgumentParser(prog="scripts/capture-docs.sh", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    unknown = sorted({name for _, name, _ in doc_blocks()} - set(BY_NAME))
    if unknown:
        print(f"capture-docs: the docs name captures that do not exist: {', '.join(unknown)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="capture-docs-") as temporary:
        directory = Path(temporary) / "cluster"
        if localcluster.up(directory, localcluster.DEFAULT_SCENARIO) != 0:
            return 1
        try:
            outputs = capture_all(running_controlplane(directory))
        finally:
            localcluster.down(directory)
    for path in rewrite(outputs):
        print(f"rewrote {path.relative_to(REPO_ROOT)}")
    print(json.dumps({name: len(text.splitlines()) for name, text in outputs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
