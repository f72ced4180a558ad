"""``scripts/local-cluster.sh``: powercap on a real Kubernetes control plane, no GPU needed.

    python -m tests.e2e.localcluster up [--dir DIR] [--scenario FILE]
    python -m tests.e2e.localcluster down [--dir DIR]

``up`` starts etcd, kube-apiserver, kube-scheduler and kube-controller-manager
(scripts/controlplane.sh), installs config/default's CRD, namespace, ServiceAccounts and
RBAC, and runs beside them, each as its own ServiceAccount: the admission webhook
(registered with its real caBundle), the extender with the power-aware kube-scheduler,
two budget controller replicas, and one simulated node agent per GPU node. The GPU Nodes,
their racks, the policies and the services (as Deployments) come from a scenario in
``powercap simulate``'s format; stand-in kubelets (tests/e2e/kubelets.py) give pods their
GPUs and run them. It prints the kubeconfig and commands to try, and returns; everything
keeps running until ``down``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from powercap.numeric import counted
from powercap.simulation.scenario import Scenario, ScenarioError, load_scenario
from tests.e2e.harness import (
    REPO_ROOT,
    ControlPlane,
    SimulatedNode,
    have_toolchain,
    install_bundle,
    register_nodes,
    serve_webhook,
    start_agents,
    start_controllers,
    start_controlplane,
    start_kubelets,
    start_power_aware_scheduler,
    stop_controlplane,
)

DEFAULT_DIR = REPO_ROOT / ".local-cluster"
DEFAULT_SCENARIO = REPO_ROOT / "scripts" / "local-cluster.yaml"
# the playground outlives a test run: its ServiceAccount tokens last a week
TOKEN_DURATION = "168h"
STOP_TIMEOUT_S = 15


def simulated_nodes(scenario: Scenario) -> list[SimulatedNode]:
    return [SimulatedNode(name, group.rack_id, group.gpus, group.gpu.name)
            for group in scenario.nodes for name in group.node_names]


def workload_objects(scenario_text: str, scenario: Scenario) -> list[dict[str, Any]]:
    """The scenario's namespaces, policies (as written) and services as Deployments of
    GPU pods for the power-aware scheduler."""
    document = yaml.safe_load(scenario_text)
    namespaces = sorted({p["metadata"]["namespace"] for p in document["policies"]} | {s.namespace for s in scenario.services})
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in namespaces]
    objects += document["policies"]
    for service in scenario.services:
        pod = service.pod_object(service.name)
        template_metadata = {key: pod["metadata"][key] for key in ("labels", "annotations") if key in pod["metadata"]}
        objects.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": service.name, "namespace": service.namespace, "labels": dict(pod["metadata"]["labels"])},
            "spec": {
                "replicas": service.replicas,
                "selector": {"matchLabels": {"app.kubernetes.io/name": service.name}},
                "template": {"metadata": template_metadata, "spec": pod["spec"]},
            },
        })
    return objects


def up(directory: Path, scenario_file: Path) -> int:
    missing = have_toolchain()
    if missing:
        print(f"local-cluster: cannot start: {missing}", file=sys.stderr)
        return 2
    try:
        scenario_text = scenario_file.read_text()
        scenario = load_scenario(scenario_text)
    except OSError as error:
        print(f"local-cluster: {scenario_file}: {error.strerror or error}", file=sys.stderr)
        return 2
    except ScenarioError as error:
        problems = "\n".join(f"  {problem}" for problem in error.problems)
        print(f"local-cluster: {scenario_file} is not a valid scenario:\n{problems}", file=sys.stderr)
        return 2
    if (directory / "controlplane.env").exists():
        print(f"local-cluster: a cluster is already up in {directory}; run scripts/local-cluster.sh down first",
              file=sys.stderr)
        return 1
    nodes = simulated_nodes(scenario)
    started = time.monotonic()
    step("control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager)")
    plane = start_controlplane(directory)
    try:
        step("CRD, namespace powercap-system, ServiceAccounts and RBAC of config/default")
        install_bundle(plane)
        step("admission webhook")
        serve_webhook(plane, sa_duration=TOKEN_DURATION)
        step("extender and the power-aware kube-scheduler")
        start_power_aware_scheduler(plane, sa_duration=TOKEN_DURATION)
        step("budget controller, 2 replicas")
        start_controllers(plane, ("controller-0", "controller-1"), interval_s=5, sa_duration=TOKEN_DURATION)
        step(f"{len(nodes)} GPU nodes from {scenario_file.name} ({scenario.name}): stand-in kubelets and simulated agents")
        register_nodes(plane, nodes)
        sockets = start_kubelets(plane, nodes)
        start_agents(plane, nodes, sockets, sa_duration=TOKEN_DURATION)
        step("the scenario's policies and services")
        plane.apply(workload_objects(scenario_text, scenario))
    except BaseException:
        print(f"local-cluster: start-up failed; logs in {directory / 'logs'}", file=sys.stderr)
        down(directory)
        raise
    print(summary(plane, nodes, time.monotonic() - started))
    return 0


def step(what: str) -> None:
    print(f"starting {what}", file=sys.stderr, flush=True)


def summary(plane: ControlPlane, nodes: Sequence[SimulatedNode], took_s: float) -> str:
    kubeconfig = plane.kubeconfig
    racks = sorted({node.rack for node in nodes})
    return f"""
powercap is running on a local Kubernetes {plane.env.get('CONTROLPLANE_RELEASE', '')} control plane ({took_s:.0f} s):
{counted(len(nodes), 'simulated GPU node')} in {counted(len(racks), 'rack')} ({', '.join(racks)}), {counted(sum(n.gpus for n in nodes), 'GPU')}.

  export KUBECONFIG={kubeconfig}

Try:
  kubectl get nodes -L powercapping.example.com/rack
  kubectl get pcp -A                                   # budgets, allocations, conditions
  kubectl get pods -A -o wide                          # placed by power-aware-scheduler
  kubectl apply -f config/samples/basic.yaml           # admitted (and defaulted) by the webhook
  kubectl apply -f - <<'EOF'                           # refused by the webhook, naming the field
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata: {{name: typo, namespace: default}}
spec: {{powerCapLimit: 2000, customAlgorithm: {{name: energy-aware}}}}
EOF
  kubectl scale deployment -n inference chat --replicas=14  # Pending pods say why: kubectl describe pod
  kubectl get lease -n powercap-system                 # the controller's leader
  kubectl get pcn                                      # each node's power and inlet, as its agent published them
  kubectl get pcn {nodes[0].name} -o yaml                 # its GPUs: power, limits, pods, tokens/s

Logs: {plane.directory / 'logs'}/*.log
Stop: scripts/local-cluster.sh down
"""


def down(directory: Path) -> int:
    """Stop powercap's programs (their pid files), then the control plane."""
    run = directory / "run"
    pids = []
    for pid_file in sorted(run.glob("powercap-*.pid")) if run.is_dir() else []:
        try:
            pid = int(pid_file.read_text().strip())
            os.killpg(pid, signal.SIGTERM)
            pids.append(pid)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for pid in pids:
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if running(pid):
            os.killpg(pid, signal.SIGKILL)
    stop_controlplane(directory)
    return 0


def running(pid: int) -> bool:
    """Whether process ``pid`` has not ended. A process that ended but was not reaped yet (a
    zombie: what `up`'s programs become under an init that does not reap) has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/local-cluster.sh", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start the cluster and powercap, print how to use it")
    stop = commands.add_parser("down", help="stop everything up started")
    for command in (start, stop):
        command.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                             help=f"state, certificates and logs (default {DEFAULT_DIR.relative_to(REPO_ROOT)}/)")
    start.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO,
                       help=f"nodes, racks, policies and services (default {DEFAULT_SCENARIO.relative_to(REPO_ROOT)}; "
                            "any `powercap simulate` scenario)")
    args = parser.parse_args(argv)
    directory = args.dir.resolve()
    if args.command == "up":
        try:
            return up(directory, args.scenario)
        except (RuntimeError, AssertionError, subprocess.SubprocessError) as error:
            print(f"local-cluster: {error}", file=sys.stderr)
            return 1
    return down(directory)


if __name__ == "__main__":
    sys.exit(main())
