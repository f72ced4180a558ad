"""No single client stops the webhook or the extender: answers under slow clients, and memory
for the largest bodies.

    .venv/bin/python benchmarks/servers.py [--root CHECKOUT] [--requests 10] [--hold-s 20]

Two tables, for ``powercap webhook`` (gunicorn, default 2 workers x 4 threads, TLS) and
``powercap extender`` (1 worker x 4 threads, on a snapshot), both started as deployed on
127.0.0.1:

1. **Slow clients**: requests on new connections answered within 1 s, out of
   ``--requests``, with no load, then while 200 idle TCP connections and 50 slowloris ones
   (heads and bodies trickled a byte every half second; for the webhook also TLS
   handshakes never completed) are held open; each request runs 1 s apart over
   ``--hold-s`` seconds, so the load outlives the servers' 10 s request deadline;
2. **Memory**: the peak RSS (``VmHWM``) of the worker process that answered, in a fresh
   server, after the largest bodies the limits accept (and, for comparison, bodies the
   limits refuse), and the worker's RSS when idle.

``--root`` runs the servers from another checkout of powercap (``git worktree add
/tmp/before <commit>``) with the same load, to compare before and after. Every loop is
bounded in count and time; only 127.0.0.1 is used. The machine line says where it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
import yaml  # noqa: E402

from common import machine  # noqa: E402
from tests.fakes.objects import extender_args, gpu_node, gpu_pod, kubectl_list, policy, telemetry  # noqa: E402
from tests.webhook_helpers import admission_review, free_port, issue_certificates, slow_clients  # noqa: E402
from tests.webhook_helpers import policy as webhook_policy  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
LIMIT_S = 1.0


def worker_pids(arbiter: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{arbiter}/task").iterdir():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def server(argv: list[str], root: Path, ready_url: str, verify: str | bool, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"PYTHONPATH": str(root)}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "powercap", *argv], cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        with requests.Session() as session:
            session.trust_env = False
            while True:
                if process.poll() is not None:
                    raise RuntimeError(log.read_text())
                try:
                    if session.get(ready_url, timeout=2, verify=verify).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(log.read_text())
                time.sleep(0.05)
        time.sleep(0.5)  # every worker booted
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def timed_calls(call: Callable[[], None], count: int, spacing_s: float) -> tuple[int, list[float]]:
    answered, latencies = 0, []
    for index in range(count):
        started = time.monotonic()
        try:
            call()
            elapsed = time.monotonic() - started
        except Exception:
            elapsed = float("inf")
        latencies.append(elapsed)
        answered += elapsed <= LIMIT_S
        if index + 1 < count:
            time.sleep(max(0.0, spacing_s - (time.monotonic() - started)))
    return answered, latencies


class Webhook:
    name = "webhook"

    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        self.certs = work / "certs"
        if not self.certs.exists():
            issue_certificates(self.certs)

    @contextmanager
    def running(self, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
        port = free_port()
        argv = ["webhook", "--cert-dir", str(self.certs), "--bind", f"127.0.0.1:{port}", "--no-cross-policy-checks"]
        with server(argv, self.root, f"https://127.0.0.1:{port}/readyz", str(self.certs / "ca.crt"), log) as process:
            yield process, port

    def call(self, port: int) -> Callable[[], None]:
        review = admission_review("CREATE", webhook_policy())

        def validate() -> None:
            with requests.Session() as session:
                session.trust_env = False
                reply = session.post(f"https://127.0.0.1:{port}/validate", json=review, timeout=LIMIT_S,
                                     verify=str(self.certs / "ca.crt"))
                assert reply.status_code == 200 and reply.json()["response"]["allowed"] is True

        return validate

    def post(self, port: int, endpoint: str, body: bytes) -> str:
        with requests.Session() as session:
            session.trust_env = False
            reply = session.post(f"https://127.0.0.1:{port}/{endpoint}", data=body, timeout=60, verify=str(self.certs / "ca.crt"),
                                 headers={"Content-Type": "application/json"})
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}"
        response = reply.json()["response"]
        if response["allowed"] or response["status"]["code"] == 422:
            return f"answered ({len(reply.content) / 1e6:.1f} MB reply)" if len(reply.content) > 100_000 else "answered"
        return f"refused {response['status']['code']}"

    def bodies(self) -> list[tuple[str, str, bytes]]:
        def with_parameters(raw: bytes, operation: str = "CREATE") -> bytes:
            review = admission_review(operation, webhook_policy(customAlgorithm={"name": "headroom", "parameters": {"x": "PLACEHOLDER"}}))
            return json.dumps(review).encode().replace(b'"PLACEHOLDER"', raw)

        racks = [{"rackId": f"rack-{i}", "maxPower": 5000 + i, "maxTemperature": 30} for i in range(256)]
        big = webhook_policy(rackConstraints=racks)
        big["metadata"]["managedFields"][0]["fieldsV1"] = {"f:spec": {"f:rackConstraints": {
            f'k:{{"rackId":"rack-{i}"}}': {".": {}, "f:maxPower": {}, "f:maxTemperature": {}, "f:rackId": {}} for i in range(256)}}}
        # about 19 900 values: 1 + commas + containers stays under 20 000
        many = json.dumps([[{"a": "x" * 40} for _ in range(900)] for _ in range(7)]).encode()
        return [
            ("accepted", "2.9 MB string (largest body)", with_parameters(json.dumps("y" * 2_900_000).encode())),
            ("accepted", "1 MB of strings x 2 (UPDATE)", json.dumps(admission_review(
                "UPDATE", *[webhook_policy(customAlgorithm={"name": "headroom", "parameters": {"x": ["z" * 1000] * 700}})] * 2)).encode()),
            ("accepted", "~19 900 values (most values)", with_parameters(many)),
            ("accepted", "256 racks + managedFields, UPDATE", json.dumps(admission_review("UPDATE", big, big)).encode()),
            ("refused", "1M-item list (3 MB)", with_parameters(b"[" + b",".join([b"0"] * 1_000_000) + b"]")),
            ("refused", "80 000 matchExpressions (2.9 MB)", json.dumps(admission_review("CREATE", webhook_policy(
                selector={"matchExpressions": [{"key": f"k{i}", "operator": "In"} for i in range(80_000)]}))).encode()),
            ("refused", "500 levels deep", with_parameters(b"[" * 500 + b"]" * 500)),
            ("refused", "500 levels deep, /mutate", with_parameters(b"[" * 500 + b"]" * 500)),
            ("refused", "1M-item rackConstraints (2 MB)", json.dumps(admission_review("CREATE", webhook_policy(
                rackConstraints="PLACEHOLDER"))).encode().replace(b'"PLACEHOLDER"', b"[" + b",".join([b"0"] * 1_000_000) + b"]")),
        ]


class Extender:
    name = "extender"
    NODES = [gpu_node(f"gpu-{i}", f"rack-{i % 4}", telemetry(1000)) for i in range(8)]

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.snapshot = work / "snapshot.yaml"
        if not self.snapshot.exists():
            self.snapshot.write_text(yaml.safe_dump(kubectl_list(self.NODES, [], [policy("llama")])))

    @contextmanager
    def running(self, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
        port = free_port()
        argv = ["extender", "--cluster-state", str(self.snapshot), "--bind", f"127.0.0.1:{port}"]
        with server(argv, self.root, f"http://127.0.0.1:{port}/readyz", False, log) as process:
            yield process, port

    def call(self, port: int) -> Callable[[], None]:
        body = extender_args(gpu_pod("llama-0", gpus=1), self.NODES, node_cache_capable=True)

        def filter_() -> None:
            with requests.Session() as session:
                session.trust_env = False
                reply = session.post(f"http://127.0.0.1:{port}/filter", data=body, timeout=LIMIT_S)
                assert reply.status_code == 200 and len(reply.json()["NodeNames"]) == len(self.NODES)

        return filter_

    def post(self, port: int, endpoint: str, body: bytes) -> str:
        with requests.Session() as session:
            session.trust_env = False
            reply = session.post(f"http://127.0.0.1:{port}/{endpoint}", data=body, timeout=120)
        return "answered" if reply.status_code == 200 else f"HTTP {reply.status_code}"

    def bodies(self) -> list[tuple[str, str, bytes]]:
        nodes = [gpu_node(f"gpu-{i:05d}", f"rack-{i // 8}", telemetry(2000.0, inlet_c=22.0)) for i in range(5000)]
        pod = gpu_pod("llama-0", gpus=1)
        fat_pod = gpu_pod("llama-1", gpus=1)
        fat_pod["metadata"]["annotations"]["bulk"] = "a" * (4 * 1024 * 1024 - 20_000)
        return [
            ("accepted", "5000 full Nodes (largest call)", extender_args(pod, nodes, node_cache_capable=False)),
            ("accepted", "100 000 NodeNames", json.dumps({"Pod": pod, "NodeNames": [f"gpu-{i:06d}" for i in range(100_000)]}).encode()),
            ("accepted", "Pod of ~4 MiB", extender_args(fat_pod, self.NODES, node_cache_capable=True)),
            ("refused", "Pod 900 levels deep", extender_args(pod, self.NODES, node_cache_capable=True).replace(
                b'"metadata":{', b'"metadata":{"deep":' + b"[" * 900 + b"]" * 900 + b",", 1)),
            ("refused", "10M tiny Node items (30 MB)", b'{"Pod": {}, "Nodes": {"items": [' + b",".join([b"{}"] * 10_000_000) + b"]}}"),
            ("refused", "5000 levels deep after the Pod", extender_args(pod, self.NODES, node_cache_capable=True)[:-1]
             + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}"),
            ("refused", "GPU quantity of 5000 digits", extender_args(
                {**pod, "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "9" * 5000}}}]}},
                self.NODES, node_cache_capable=True)),
        ]


def slow_client_rows(target: Webhook | Extender, work: Path, requests_: int, hold_s: float) -> list[str]:
    rows = []
    with target.running(work / f"{target.name}-slow.log") as (process, port):
        call = target.call(port)
        answered, latencies = timed_calls(call, requests_, 0.0)
        rows.append(f"| {target.name} | none | {answered} of {requests_} | {max(latencies):.3f} |")
        path = "/validate" if target.name == "webhook" else "/filter"
        with slow_clients(port, tls=target.name == "webhook", idle=200, slow=50, path=path, hold_limit_s=hold_s + 30) as load:
            time.sleep(0.5)
            answered, latencies = timed_calls(call, requests_, hold_s / requests_)
            shape = (f"200 idle + {load.handshakes} TLS handshakes + {load.heads} heads + {load.bodies} bodies"
                     if target.name == "webhook" else f"200 idle + {load.heads} heads + {load.bodies} bodies")
            opened = f"; {load.not_opened} not even opened at first" if load.not_opened else ""
            rows.append(f"| {target.name} | {shape} (server closed {load.closed_by_server}, reopened{opened}) | "
                        f"{answered} of {requests_} | {max(latencies):.3f} |")
        del process
    return rows


def memory_rows(target: Webhook | Extender, work: Path) -> list[str]:
    rows = []
    for verdict, label, body in target.bodies():
        with target.running(work / f"{target.name}-memory.log") as (process, port):
            pids = worker_pids(process.pid)
            idle_kib = max(status_kib(pid, "VmRSS") for pid in pids)
            endpoint = ("mutate" if label.endswith("/mutate") else "validate") if target.name == "webhook" else "filter"
            started = time.monotonic()
            try:
                outcome = target.post(port, endpoint, body)
            except requests.RequestException as error:
                outcome = f"failed ({type(error).__name__})"
            elapsed = time.monotonic() - started
            peak_kib = max(status_kib(pid, "VmHWM") for pid in pids if Path(f"/proc/{pid}").exists())
        rows.append(f"| {target.name} | {label} | {len(body) / 1e6:.1f} MB | {verdict}: {outcome} | {elapsed:.2f} s | "
                    f"{idle_kib / 1024:.0f} MiB | {peak_kib / 1024:.0f} MiB | {(peak_kib - idle_kib) / 1024:+.0f} MiB |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HERE, help="checkout to run the servers from (default: this one)")
    parser.add_argument("--requests", type=int, default=10, help="requests per row (default 10)")
    parser.add_argument("--hold-s", type=float, default=20.0, help="seconds the slow load is held while requests run (default 20)")
    parser.add_argument("--skip-memory", action="store_true", help="only the slow-client table")
    parser.add_argument("--skip-slow", action="store_true", help="only the memory table")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="powercap-servers-bench-"))
    targets = [Webhook(args.root, work), Extender(args.root, work)]
    print(f"Machine: {machine()}")
    print(f"Servers from: {args.root} ({_commit(args.root)})\n")
    if not args.skip_slow:
        print(f"| server | held open meanwhile | answered within {LIMIT_S:.0f} s | slowest (s) |")
        print("| --- | --- | --- | --- |")
        for target in targets:
            for row in slow_client_rows(target, work, args.requests, args.hold_s):
                print(row, flush=True)
    if not args.skip_memory:
        print("\n| server | body | size | verdict | time | worker RSS idle | worker peak RSS | peak - idle |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for target in targets:
            for row in memory_rows(target, work):
                print(row, flush=True)
    return 0


def _commit(root: Path) -> str:
    result = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return re.sub(r"\s+", " ", result.stdout.strip())[:60] or "not a git checkout"


if __name__ == "__main__":
    sys.exit(main())
