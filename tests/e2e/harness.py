"""A real control plane (scripts/controlplane.sh) with powercap's programs beside it.

Everything runs as plain processes on 127.0.0.1: etcd, kube-apiserver and kube-scheduler
built from Kubernetes' own Go modules, and ``powercap webhook`` / ``extender`` /
``controller`` / ``agent`` from this checkout. Each program talks to the API server as its
own ServiceAccount, with the RBAC of config/ (a token from the TokenRequest API), so a
missing permission fails a test as it would fail in a cluster.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import urllib.request
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROLPLANE = REPO_ROOT / "scripts" / "controlplane.sh"
NAMESPACE = "powercap-system"
POWERCAP = str(Path(sys.executable).parent / "powercap")
# what the kustomize bundle installs that needs no kubelet or controller-manager
CLUSTER_KINDS = ("Namespace", "CustomResourceDefinition", "ServiceAccount", "Role", "ClusterRole",
                 "RoleBinding", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


class CommandFailed(AssertionError):
    """A command exited non-zero; the message holds its command line and output."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


@dataclass
class ControlPlane:
    """The running control plane: its directory, its environment file, and kubectl."""

    directory: Path
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def kubeconfig(self) -> str:
        return self.env["KUBECONFIG"]

    @property
    def server(self) -> str:
        return self.env["APISERVER_URL"]

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True,
                kubeconfig: str | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """``kubectl ARGS`` as the cluster admin (or with ``kubeconfig``); output as text."""
        command = ["kubectl", "--kubeconfig", kubeconfig or self.kubeconfig, *args]
        done = subprocess.run(command, input=input_text, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise CommandFailed(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def apply(self, documents: Iterable[Mapping[str, Any]] | str, *, check: bool = True,
              kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
        text = documents if isinstance(documents, str) else yaml.safe_dump_all(list(documents), sort_keys=False)
        return self.kubectl("apply", "-f", "-", input_text=text, check=check, kubeconfig=kubeconfig)

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def service_account_kubeconfig(self, name: str, namespace: str = NAMESPACE, duration: str = "1h",
                                   pod: str | None = None) -> str:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (a bound token
        that lasts ``duration``; bound to Pod ``namespace/pod`` when given, as the kubelet
        mounts it: such a token names the pod's node)."""
        bound = ["--bound-object-kind", "Pod", "--bound-object-name", pod] if pod else []
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration", duration, *bound).stdout.strip()
        path = self.directory / f"sa-{namespace}-{name}{'-' + pod if pod else ''}.kubeconfig"
        ca = base64.b64encode(Path(self.env["CA_FILE"]).read_bytes()).decode()
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": name}}],
            "current-context": "e2e",
        }))
        path.chmod(0o600)
        return str(path)

    def spawn(self, name: str, command: Sequence[str], *, kubeconfig: str | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Run ``command`` in the background in its own session, logging to DIR/logs/NAME.log,
        its pid in DIR/run/powercap-NAME.pid (what ``scripts/local-cluster.sh down`` stops)."""
        log = (self.directory / "logs" / f"{name}.log").open("ab")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if kubeconfig:
            environment["KUBECONFIG"] = kubeconfig
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True, cwd=REPO_ROOT)
        log.close()
        (self.directory / "run").mkdir(exist_ok=True)
        (self.directory / "run" / f"powercap-{name}.pid").write_text(f"{process.pid}\n")
        self.processes.append(process)
        return process

    def start(self, name: str, args: Sequence[str], *, kubeconfig: str | None = None,
              ready: Callable[[], object] | None = None, timeout_s: float = 60,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Run ``powercap ARGS`` in the background (see :meth:`spawn`); wait for ``ready``."""
        process = self.spawn(name, [POWERCAP, *args], kubeconfig=kubeconfig, env=env)
        if ready is not None:
            def up() -> object:
                if process.poll() is not None:
                    raise AssertionError(f"powercap {name} exited {process.returncode}:\n{self.log_tail(name)}")
                return ready()
            wait_until(up, timeout_s, f"powercap {name} to be ready")
        return process

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.directory / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, process: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process in self.processes:
            self.processes.remove(process)
        for pid_file in (self.directory / "run").glob("powercap-*.pid"):
            if pid_file.read_text().strip() == str(process.pid):
                pid_file.unlink()

    def stop_all(self) -> None:
        for process in list(reversed(self.processes)):
            self.stop(process)


def controlplane_bin() -> Path:
    """The built control plane's bin directory (built now when missing: minutes)."""
    done = subprocess.run(["bash", str(CONTROLPLANE), "path"], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/controlplane.sh path failed:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def start_controlplane(directory: Path, scheduler_config: Path | None = None) -> ControlPlane:
    env = {**os.environ}
    if scheduler_config is not None:
        env["CONTROLPLANE_SCHEDULER_ARGS"] = f"--config={scheduler_config}"
    done = subprocess.run(["bash", str(CONTROLPLANE), "up", str(directory)], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        subprocess.run(["bash", str(CONTROLPLANE), "down", str(directory)], capture_output=True, timeout=120)
        raise RuntimeError(f"scripts/controlplane.sh up failed:\n{done.stderr}")
    return running_controlplane(directory)


def running_controlplane(directory: Path) -> ControlPlane:
    """The control plane that ``scripts/controlplane.sh up DIR`` started, from DIR/controlplane.env."""
    values = dict(line.split("=", 1) for line in (directory / "controlplane.env").read_text().splitlines() if "=" in line)
    return ControlPlane(directory, values)


def for_create(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` without the metadata the API server sets (uid, resourceVersion, ...):
    tests/fakes/objects.py builds objects as a server returns them."""
    for key in ("uid", "resourceVersion", "creationTimestamp", "ownerReferences", "generation"):
        document["metadata"].pop(key, None)
    return document


def ensure_namespace(plane: ControlPlane, name: str) -> None:
    """Namespace ``name``, once kube-controller-manager made its ServiceAccount ``default``
    (pods are refused in a namespace until then)."""
    plane.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}])
    wait_until(lambda: plane.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
               30, f"the ServiceAccount default in {name}")


def stop_controlplane(directory: Path) -> None:
    subprocess.run(["bash", str(CONTROLPLANE), "down", str(directory)], capture_output=True, timeout=120)


def bundle_objects(kinds: Sequence[str] = CLUSTER_KINDS) -> list[dict[str, Any]]:
    """The objects of ``kubectl kustomize config/default`` of these kinds, in that order."""
    text = subprocess.run(["kubectl", "kustomize", str(REPO_ROOT / "config" / "default")],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    objects = [o for o in yaml.safe_load_all(text) if o]
    return sorted((o for o in objects if o["kind"] in kinds), key=lambda o: kinds.index(o["kind"]))


def webhook_configurations(url: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    """config/webhook's two configurations, pointed at ``url`` (the webhook on 127.0.0.1)."""
    documents = yaml.safe_load_all((REPO_ROOT / "config" / "webhook" / "webhooks.yaml").read_text())
    configurations = []
    for document in documents:
        for hook in document["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": base64.b64encode(ca_bundle).decode()}
        configurations.append(document)
    return configurations


def have_toolchain() -> str | None:
    """Why the control plane cannot be built here, or None."""
    for tool in ("go", "kubectl", "openssl", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def start_webhook(cluster: ControlPlane, certs: Path, port: int, sa_duration: str = "1h") -> subprocess.Popen[bytes]:
    """``powercap webhook`` on 127.0.0.1:``port`` with the certificates in ``certs``, as
    ServiceAccount powercap-webhook; returns once ``/readyz`` answers 200."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    return cluster.start("webhook", ["webhook", "--cert-dir", str(certs), "--bind", f"127.0.0.1:{port}", "--workers", "1"],
                         kubeconfig=cluster.service_account_kubeconfig("powercap-webhook", duration=sa_duration),
                         ready=http_ready(f"https://127.0.0.1:{port}/readyz", context))


def install_bundle(plane: ControlPlane) -> None:
    """The CRD, namespace, ServiceAccounts and RBAC of config/default (the objects that need
    no kubelet), once ``kubectl explain pcp`` works."""
    plane.apply(bundle_objects())
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/powercappingpolicies.powercapping.example.com", "crd/powercapnodes.powercapping.example.com")
    # discovery and the OpenAPI document follow the CRD a moment later
    wait_until(lambda: plane.kubectl("explain", "pcp.spec", check=False).returncode == 0, 60,
               "kubectl explain pcp to work")


def serve_webhook(plane: ControlPlane, sa_duration: str = "1h") -> str:
    """``powercap webhook`` on 127.0.0.1 as ServiceAccount powercap-webhook, registered with
    config/webhook's configurations (a url instead of the Service, the real caBundle);
    returns its URL."""
    certs = plane.directory / "webhook-certs"
    subprocess.run([POWERCAP, "certs", "--service", "powercap-webhook",
                    "--namespace", NAMESPACE, "--out", str(certs), "--extra-san", "127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    start_webhook(plane, certs, port, sa_duration)
    plane.apply(webhook_configurations(url, (certs / "ca.crt").read_bytes()))
    return url


def http_ready(url: str, context: ssl.SSLContext | None = None) -> Callable[[], bool]:
    """A readiness check: ``url`` answers 200."""
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False
    return ready


def lease_holder(plane: ControlPlane, name: str) -> str:
    """The holderIdentity of Lease ``powercap-system/name`` ("" when none)."""
    done = plane.kubectl("get", "lease", name, "-n", NAMESPACE, "-o", "json", check=False)
    return str((json.loads(done.stdout).get("spec") or {}).get("holderIdentity") or "") if done.returncode == 0 else ""


def start_power_aware_scheduler(plane: ControlPlane, *, stale_after_s: float | None = None,
                                sa_duration: str = "1h") -> str:
    """``powercap extender`` as ServiceAccount powercap-extender and a second kube-scheduler
    (profile power-aware-scheduler) calling it as ServiceAccount power-aware-scheduler, as
    config/scheduler deploys them; returns the extender's URL once the scheduler holds its
    Lease. ``stale_after_s``: the extender's ``--stale-after`` (its default when None; tests
    whose Nodes carry fixed telemetry make it long)."""
    extender_kubeconfig = plane.service_account_kubeconfig("powercap-extender", duration=sa_duration)
    scheduler_kubeconfig = plane.service_account_kubeconfig("power-aware-scheduler", duration=sa_duration)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stale_after = ["--stale-after", f"{stale_after_s:g}"] if stale_after_s is not None else []
    plane.start("extender", ["extender", "--bind", f"127.0.0.1:{port}", "--metrics-bind", f"127.0.0.1:{free_port()}",
                             *stale_after], kubeconfig=extender_kubeconfig, ready=http_ready(f"{url}/readyz"))
    config = yaml.safe_load((REPO_ROOT / "config" / "scheduler" / "scheduler-config.yaml").read_text())
    config["extenders"][0]["urlPrefix"] = url
    config["clientConnection"] = {"kubeconfig": scheduler_kubeconfig}
    config_file = plane.directory / "power-aware-scheduler.yaml"
    config_file.write_text(yaml.safe_dump(config))
    plane.spawn("power-aware-scheduler", [str(Path(plane.env["CONTROLPLANE_BIN"]) / "kube-scheduler"),
                                          f"--config={config_file}", "--secure-port=0", "--v=2"])
    wait_until(lambda: lease_holder(plane, "power-aware-scheduler"), 60, "the power-aware scheduler to take its Lease")
    return url


def start_controllers(plane: ControlPlane, identities: Sequence[str] = ("a", "b"), *, interval_s: float = 1,
                      sa_duration: str = "1h", health_port: int | None = None,
                      extra_args: Sequence[str] = ()) -> dict[str, subprocess.Popen[bytes]]:
    """``powercap controller`` replicas as ServiceAccount powercap-controller (config/controller),
    returned by identity once one of them leads; ``health_port`` for a single replica's
    /metrics (else a free port each)."""
    kubeconfig = plane.service_account_kubeconfig("powercap-controller", duration=sa_duration)
    replicas = {
        identity: plane.start(f"controller-{identity}",
                              ["controller", "--identity", identity, "--interval", f"{interval_s:g}",
                               "--health-bind", f"127.0.0.1:{health_port or free_port()}", *extra_args],
                              kubeconfig=kubeconfig)
        for identity in identities
    }
    wait_until(lambda: lease_holder(plane, "powercap-controller") in replicas, 60, "a controller to lead")
    return replicas


@dataclass(frozen=True)
class SimulatedNode:
    """A GPU node with no kubelet: its Node object, a stand-in kubelet, a simulated agent."""

    name: str
    rack: str
    gpus: int = 8
    model: str = "H200-like"

    def node_object(self) -> dict[str, Any]:
        """The Node as a GPU node's kubelet and the NVIDIA GPU feature discovery register it: Ready."""
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": {
                "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "powercapping.example.com/rack": self.rack, "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(self.gpus), "nvidia.com/gpu.product": self.model,
            }},
            "status": {
                "capacity": {"cpu": "64", "memory": "1Ti", "pods": "110", "nvidia.com/gpu": str(self.gpus)},
                "allocatable": {"cpu": "64", "memory": "1Ti", "pods": "110", "nvidia.com/gpu": str(self.gpus)},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "simulated by powercap's local cluster"}],
            },
        }


def register_nodes(plane: ControlPlane, nodes: Sequence[SimulatedNode]) -> None:
    """Create the Nodes, Ready with their GPU capacity (unlike most kinds, a Node keeps the
    status it is created with)."""
    plane.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all([node.node_object() for node in nodes]))


def start_kubelets(plane: ControlPlane, nodes: Sequence[SimulatedNode]) -> Path:
    """One stand-in kubelet process for ``nodes`` (tests/e2e/kubelets.py), as the admin;
    returns the folder of their pod-resources sockets."""
    sockets = plane.directory / "kubelet"
    plane.spawn("kubelets", [sys.executable, "-m", "tests.e2e.kubelets", "--socket-dir", str(sockets),
                             *(f"--node={node.name}={node.gpus}" for node in nodes)], kubeconfig=plane.kubeconfig)
    wait_until(lambda: all((sockets / f"{node.name}.sock").exists() for node in nodes), 30,
               "the stand-in kubelets' pod-resources sockets")
    return sockets


def agent_pod(node: str) -> dict[str, Any]:
    """The DaemonSet's pod on ``node`` as the API server holds it (bound, as ServiceAccount
    powercap-agent); the agent itself runs as a process beside it."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"powercap-agent-{node}", "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/name": "powercap-agent"}},
            "spec": {"nodeName": node, "serviceAccountName": "powercap-agent", "automountServiceAccountToken": False,
                     "containers": [{"name": "agent", "image": "powercap:latest"}]}}


def agent_kubeconfig(plane: ControlPlane, node: str, sa_duration: str = "1h") -> str:
    """A kubeconfig with the token the kubelet would mount in the agent's pod on ``node``:
    ServiceAccount powercap-agent, bound to that pod (made now when missing), so it names
    the node (what the admission policy powercap-agent-own-node checks)."""
    pod = agent_pod(node)
    if plane.kubectl("get", "pod", pod["metadata"]["name"], "-n", NAMESPACE, check=False).returncode != 0:
        plane.apply([pod])
    return plane.service_account_kubeconfig("powercap-agent", duration=sa_duration, pod=pod["metadata"]["name"])


def start_agents(plane: ControlPlane, nodes: Sequence[SimulatedNode], sockets: Path, *, interval_s: float = 1,
                 sa_duration: str = "1h") -> dict[str, str]:
    """``powercap agent --backend simulated`` per node, as ServiceAccount powercap-agent with
    the token bound to its pod on that node (:func:`agent_kubeconfig`), reading the stand-in
    kubelet's pod-resources socket and workload file; returns each agent's /status URL."""
    urls = {}
    for node in nodes:
        kubeconfig = agent_kubeconfig(plane, node.name, sa_duration)
        port = free_port()
        urls[node.name] = f"http://127.0.0.1:{port}/status"
        plane.start(f"agent-{node.name}",
                    ["agent", "--backend", "simulated", "--node", node.name, "--interval", f"{interval_s:g}",
                     "--metrics-bind", f"127.0.0.1:{port}", "--state-file", str(plane.directory / "agents" / f"{node.name}.json"),
                     "--pod-resources-socket", str(sockets / f"{node.name}.sock")],
                    kubeconfig=kubeconfig, env={"POWERCAP_SIMULATED_GPUS": str(node.gpus),
                                                "POWERCAP_SIMULATED_GPU_MODEL": node.model,
                                                "POWERCAP_SIMULATED_WORKLOAD": str(sockets / f"{node.name}.workload.json")},
                    ready=http_ready(f"http://127.0.0.1:{port}/healthz"))
    return urls
