"""Node agent cost and reaction time.

    .venv/bin/python benchmarks/agent.py [--ticks 2000] [--trials 30] [--write docs/benchmarks.md]

What it measures:

1. CPU time of one control tick (``time.thread_time``: the ticking thread only) for
   8 GPUs, each running one pod process mapped through a ``/proc/<pid>/cgroup`` file,
   owned by one policy with a per-GPU allocation, publishing to a recording publisher:
   - through the real pynvml path into the fake libnvidia-ml.so (in-process), steady
     state (caps already right: no writes) and with all 8 caps changing every tick;
   - through the simulated backend (physics advanced 1 s per tick);
2. RSS of a real ``powercap agent --backend nvml --policy FILE`` process (8 fake GPUs) after
   it has ticked for a few seconds (VmRSS and peak VmHWM from /proc);
3. policy change -> new cap set, at the default 1 s interval, with the agent ticking on its
   own thread: (a) in a cluster, a new ``status.allocations`` written to the fake API
   server (real sockets, watch-backed cache); (b) an edit of the ``--policy`` file. Each
   trial changes the policy at a random phase of the tick and times until the backend's
   setter is called with the new value;
4. one call to the kubelet's pod-resources API (``PodResourcesSource.pods_by_device``, once
   per tick in a cluster), wall time against grpcio's server in the same process.

NVML calls into the fake cost less than on a driver (power ~1 us, limits ~140 us on an
H200), so the NVML row is the agent's own overhead; add ~8 x 0.3 ms of driver time for
the per-tick limit reads on real H200s.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from common import machine, percentile, write_section  # noqa: E402
from nodeagent.agent import Agent, AgentSettings  # noqa: E402
from nodeagent.gpus import GpuBackend, GpuInfo, GpuSnapshot  # noqa: E402
from nodeagent.nvml import NvmlBackend  # noqa: E402
from nodeagent.podresources import PodResourcesSource  # noqa: E402
from nodeagent.simulated import ManualClock, SimulatedBackend  # noqa: E402
from nodeagent.sources import ClusterSource, FilePolicySource  # noqa: E402
from powercap import physics  # noqa: E402
from powercap.allocation import AllocationSettings, budget_w  # noqa: E402
from powercap.kube import KubeClient  # noqa: E402
from tests.agenthelpers import NODE, RecordingPublisher, StaticSource, pod, policy, policy_document  # noqa: E402
from tests.fakes.apiserver import FakeApiServer  # noqa: E402
from tests.fakes.kubelet import FakeKubelet  # noqa: E402
from tests.fakes.nvml import FakeNvml, build_fake_nvml, load_in_process  # noqa: E402

GPUS = 8
TARGET_TICK_CPU_MS = 5.0
TARGET_RSS_MB = 80.0
TARGET_REACTION_P99_S = 2.0


def proc_tree(root: Path, uids: list[str]) -> None:
    """``/proc/<1000+i>/cgroup`` for pod ``uids[i]`` (systemd driver, containerd)."""
    for i, uid in enumerate(uids):
        directory = root / str(1000 + i)
        directory.mkdir(parents=True)
        slice_uid = uid.replace("-", "_")
        directory.joinpath("cgroup").write_text(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/"
            f"cri-containerd-{i:064x}.scope\n"
        )


def pod_uids() -> list[str]:
    return [f"00000000-0000-4000-8000-{i:012x}" for i in range(GPUS)]


def agent_for(backend: GpuBackend, proc: Path, clock: Callable[[], float]) -> tuple[Agent, StaticSource]:
    uuids = [d.uuid for d in backend.devices()]
    uids = pod_uids()
    source = StaticSource()
    pods = {uid: pod(uid, name=f"llama-{i}") for i, uid in enumerate(uids)}
    source.set(policy(caps_w=dict.fromkeys(uuids, 400)), pods=pods)
    agent = Agent(backend, source, AgentSettings(node=NODE), publisher=RecordingPublisher(), clock=clock, proc_root=proc)
    return agent, source


def tick_cpu_ms(agent: Agent, ticks: int, before: Callable[[int], None] = lambda i: None) -> list[float]:
    samples = []
    for i in range(ticks):
        before(i)
        started = time.thread_time_ns()
        agent.tick()
        samples.append((time.thread_time_ns() - started) / 1e6)
    return samples


def measure_ticks(work: Path, ticks: int) -> dict[str, list[float]]:
    proc = work / "proc"
    proc_tree(proc, pod_uids())
    results: dict[str, list[float]] = {}
    fake = FakeNvml.in_process(load_in_process(build_fake_nvml(work / "fake-nvml"))).reset().set_count(GPUS)
    for index in range(GPUS):
        fake.set_pids(index, [1000 + index]).set_power_w(index, 380).set_temperature_c(index, 62)
    clock = ManualClock(0.0)
    with NvmlBackend() as backend:
        agent, source = agent_for(backend, proc, clock)
        agent.tick()  # caps set once
        agent.publisher = RecordingPublisher()
        results["NVML (fake library), steady state"] = tick_cpu_ms(agent, ticks, lambda i: clock.advance(1.0))
        uuids = [d.uuid for d in backend.devices()]
        policies = [policy(caps_w=dict.fromkeys(uuids, watts)) for watts in (350, 450)]
        view = source.view_now

        def flip(i: int) -> None:
            clock.advance(1.0)
            source.view_now = replace(view, policies=(policies[i % 2],))

        results["NVML (fake library), 8 caps change"] = tick_cpu_ms(agent, ticks, flip)
    clock = ManualClock(0.0)
    simulated = SimulatedBackend([physics.H200_LIKE] * GPUS, clock=clock)
    for index in range(GPUS):
        simulated.set_workload(index, physics.Workload(load=0.8, prefill_share=0.2))
        simulated.set_pids(index, [1000 + index])
    agent, _ = agent_for(simulated, proc, clock)
    agent.tick()
    results["simulated, steady state"] = tick_cpu_ms(agent, ticks, lambda i: clock.advance(1.0))
    return results


def measure_rss(work: Path) -> tuple[float, float]:
    """VmRSS and VmHWM (MB) of ``powercap agent`` on 8 fake GPUs after 5 s of ticking."""
    build = build_fake_nvml(work / "fake-nvml-rss")
    fake = FakeNvml.for_subprocess(build, work)
    fake.set_count(GPUS)
    policy_file = work / "rss-policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy_document("llama", cap_w=3200)))
    command = [sys.executable, "-m", "powercap", "agent", "--backend", "nvml", "--policy", str(policy_file),
               "--node", NODE, "--state-file", str(work / "rss-state.json"), "--metrics-bind", "127.0.0.1:0"]
    process = subprocess.Popen(command, env={**os.environ, **fake.env()}, stderr=subprocess.DEVNULL)
    try:
        time.sleep(6.0)
        status = Path(f"/proc/{process.pid}/status").read_text()
    finally:
        process.terminate()
        process.wait(10)

    def field_mb(name: str) -> float:
        match = re.search(rf"^{name}:\s+(\d+) kB", status, re.MULTILINE)
        assert match, name
        return int(match.group(1)) / 1024

    return field_mb("VmRSS"), field_mb("VmHWM")


class TimedBackend(GpuBackend):
    """Delegates to a backend and records when each limit was asked for."""

    def __init__(self, inner: GpuBackend) -> None:
        self.inner = inner
        self.sets: list[tuple[float, int, float]] = []
        self.lock = threading.Lock()

    def devices(self) -> list[GpuInfo]:
        return self.inner.devices()

    def snapshot(self, index: int) -> GpuSnapshot:
        return self.inner.snapshot(index)

    def set_power_limit_w(self, index: int, watts: float) -> float:
        with self.lock:
            self.sets.append((time.monotonic(), index, watts))
        return self.inner.set_power_limit_w(index, watts)

    def compute_pids(self, index: int) -> list[int]:
        return self.inner.compute_pids(index)

    def total_energy_j(self, index: int) -> float:
        return self.inner.total_energy_j(index)

    def wait_for(self, index: int, watts: float, since_s: float, timeout_s: float = 10.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                for at_s, i, w in self.sets:
                    if at_s >= since_s and i == index and w == watts:
                        return at_s
            time.sleep(0.002)
        raise TimeoutError(f"GPU {index} never set to {watts} W")


def reaction_trials(
    backend: TimedBackend, agent: Agent, change: Callable[[int], float | None], trials: int, rng: random.Random
) -> list[float]:
    """Seconds from ``change(watts)`` to the setter call, with the agent on its own thread;
    ``change`` returns the limit the agent will set when that is not ``watts``."""
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    latencies = []
    try:
        for trial in range(trials):
            watts = 300 + 10 * (trial % 20)
            time.sleep(rng.uniform(0.0, 1.0))
            started = time.monotonic()
            expected = change(watts)
            latencies.append(backend.wait_for(0, watts if expected is None else expected, started) - started)
    finally:
        stop.set()
        thread.join(5)
    return latencies


def measure_reaction(work: Path, trials: int) -> dict[str, list[float]]:
    rng = random.Random(7)
    results = {}
    simulated = SimulatedBackend([physics.H200_LIKE], clock=time.monotonic)
    uuid = simulated.devices()[0].uuid
    with FakeApiServer() as server, KubeClient.for_server(server.url) as client:
        server.put_object("nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        document = policy_document("llama")
        server.put_object("powercappingpolicies", document)
        source = ClusterSource(client, NODE)
        source.start()
        assert source.policies.wait_synced(10) and source.pods.wait_synced(10)
        backend = TimedBackend(simulated)
        agent = Agent(backend, source, AgentSettings(node=NODE))

        def allocate(watts: int) -> None:
            gpus = [{"uuid": uuid, "watts": watts}]
            status = {"allocations": [{"node": NODE, "gpus": gpus, "watts": watts}]}
            server.put_object("powercappingpolicies", {**document, "status": status})

        results["cluster: status.allocations via watch"] = reaction_trials(backend, agent, allocate, trials, rng)
        source.stop()
    policy_file = work / "reaction-policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy_document("llama", cap_w=700)))
    simulated = SimulatedBackend([physics.H200_LIKE], clock=time.monotonic)
    backend = TimedBackend(simulated)
    agent = Agent(backend, FilePolicySource(policy_file, NODE, [uuid]), AgentSettings(node=NODE))

    def edit(watts: int) -> float:
        policy_file.write_text(yaml.safe_dump(policy_document("llama", cap_w=watts)))
        return budget_w(watts, AllocationSettings().margin)  # --policy FILE keeps the controller's margin

    results["--policy FILE: file edited"] = reaction_trials(backend, agent, edit, trials, rng)
    return results


def measure_pod_resources(calls: int) -> list[float]:
    """Wall ms of ``PodResourcesSource.pods_by_device`` against grpcio's server answering
    for one pod per GPU (tests/fakes/kubelet.py), server time included."""
    kubelet = FakeKubelet()
    kubelet.assignments = {
        f"inference/llama-{i}": {"server": {"nvidia.com/gpu": [f"GPU-{i:08d}-0000-4000-8000-000000000000"]}} for i in range(GPUS)
    }
    kubelet.start()
    source = PodResourcesSource(kubelet.socket_path)
    try:
        assert len(source.pods_by_device()) == GPUS
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            source.pods_by_device()
            samples.append((time.perf_counter() - started) * 1000)
        return samples
    finally:
        kubelet.remove()


def render(ticks: dict[str, list[float]], rss: tuple[float, float], reaction: dict[str, list[float]], n_ticks: int,
           pod_resources_ms: list[float]) -> str:
    lines = [
        "## Node agent",
        "",
        "`benchmarks/agent.py` (docstring says what each row measures). Machine: " + machine() + ".",
        "Wall-clock rows depend on what else ran on these cores (load average above).",
        "",
        f"One control tick, {GPUS} GPUs, CPU time of the ticking thread, {n_ticks} ticks (target <= {TARGET_TICK_CPU_MS:g} ms):",
        "",
        "| backend | p50 ms | p99 ms |",
        "| --- | --- | --- |",
    ]
    for name, samples in ticks.items():
        lines.append(f"| {name} | {percentile(samples, 0.50):.3f} | {percentile(samples, 0.99):.3f} |")
    lines += [
        "",
        "The fake library answers in nanoseconds; on H200s each tick also reads two power limits per",
        "GPU at ~140 us each (DESIGN.md section 6): about 2.3 ms more for 8 GPUs, still under 5 ms.",
        "The energy counter (~3 ms) is never read in a tick.",
        "",
        f"Agent process RSS (`powercap agent --backend nvml --policy FILE`, {GPUS} fake GPUs, after 6 s; "
        f"target <= {TARGET_RSS_MB:g} MB): VmRSS {rss[0]:.1f} MB, peak VmHWM {rss[1]:.1f} MB. The kubernetes",
        "client is imported in this mode too; in a cluster the two watch caches add the policies and",
        "this node's pods.",
        "",
        f"The kubelet's pod-resources call (`PodResourcesSource.pods_by_device`, once per tick in a cluster: a new",
        "unix-socket connection, one HTTP/2 request, the answer decoded), against grpcio's server in the",
        f"same process answering for {GPUS} pods, server time included, {len(pod_resources_ms)} calls: "
        f"p50 {percentile(pod_resources_ms, 0.50):.2f} ms, p99 {percentile(pod_resources_ms, 0.99):.2f} ms "
        "(not part of the tick rows above).",
        "",
        f"Policy change -> new cap set, default 1 s interval (target p99 <= {TARGET_REACTION_P99_S:g} s):",
        "",
        "| change | trials | p50 s | p99 s | max s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, samples in reaction.items():
        lines.append(
            f"| {name} | {len(samples)} | {statistics.median(samples):.3f} | {percentile(samples, 0.99):.3f} | {max(samples):.3f} |"
        )
    lines += [
        "",
        "Real GPU: the read-only check `powercap agent --dry-run --backend nvml --policy ...` on an",
        "H100/H200 could not be run in this session (no GPU machine was available to it); the NVML",
        "path was exercised only through the fake libnvidia-ml.so.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--write", type=Path, help="Markdown file whose '## Node agent' section is replaced")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="powercap-agent-bench-") as directory:
        work = Path(directory)
        ticks = measure_ticks(work, args.ticks)
        rss = measure_rss(work)
        reaction = measure_reaction(work, args.trials)
    pod_resources_ms = measure_pod_resources(args.ticks)
    section = render(ticks, rss, reaction, args.ticks, pod_resources_ms)
    print(section)
    if args.write:
        write_section(args.write, "Node agent", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
