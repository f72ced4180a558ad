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
                 "RoleBinding", "ClusterRoleBinding")


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

    def service_account_kubeconfig(self, name: str, namespace: str = NAMESPACE) -> str:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (a bound token, 1 h)."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration", "1h").stdout.strip()
        path = self.directory / f"sa-{namespace}-{name}.kubeconfig"
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

    def start(self, name: str, args: Sequence[str], *, kubeconfig: str | None = None,
              ready: Callable[[], object] | None = None, timeout_s: float = 60) -> subprocess.Popen[bytes]:
        """Run ``powercap ARGS`` in the background, logging to DIR/logs/NAME.log; wait for ``ready``."""
        log = (self.directory / "logs" / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if kubeconfig:
            env["KUBECONFIG"] = kubeconfig
        process = subprocess.Popen([POWERCAP, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        self.processes.append(process)
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
    values = dict(line.split("=", 1) for line in (directory / "controlplane.env").read_text().splitlines() if "=" in line)
    return ControlPlane(directory, values)


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


def start_webhook(cluster: ControlPlane, certs: Path, port: int) -> subprocess.Popen[bytes]:
    """``powercap webhook`` on 127.0.0.1:``port`` with the certificates in ``certs``, as
    ServiceAccount powercap-webhook; returns once ``/readyz`` answers 200."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    return cluster.start("webhook", ["webhook", "--cert-dir", str(certs), "--bind", f"127.0.0.1:{port}", "--workers", "1"],
                         kubeconfig=cluster.service_account_kubeconfig("powercap-webhook"), ready=ready)
