"""``powercap agent``: enforce per-GPU power caps on this node (docs/nodeagent.md).

In a cluster (default) it watches policies and this node's pods and publishes telemetry;
with ``--policy FILE`` it runs on a single GPU server without Kubernetes. Bad
configuration (no NVML, unreadable policy file, no kubeconfig) stops it at start-up with
exit status 2 (1 for a GPU library that cannot start); SIGTERM and SIGINT end it with 0,
caps left in place unless ``--restore-on-exit``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from powercap.runtime.logs import configure_logging
from nodeagent.agent import Agent, AgentSettings
from nodeagent.gpus import GpuBackend, GpuError
from nodeagent.inlet import InletSource, NoInlet, inlet_spec_argument
from nodeagent.metrics import AgentMetrics, NodePowerMetrics, agent_routes
from nodeagent.nodepower import DEFAULT_KEPLER_URL
from nodeagent.nodepowerconfig import (
    DEFAULT_CREDENTIALS_DIR,
    NodePowerConfigError,
    NodePowerSettings,
    build_sampler,
    load_settings,
    sources_argument,
)
from nodeagent.podresources import DEFAULT_GPU_RESOURCES, DEFAULT_SOCKET, PodResourcesSource
from nodeagent.publisher import KubePublisher, NullPublisher, Publisher
from nodeagent.sources import ClusterSource, FilePolicySource, PolicyFileError, PolicySource
from nodeagent.state import DEFAULT_STATE_FILE, StateFile
from nodeagent.tokens import DEFAULT_TOKENS_METRIC, DEFAULT_WAITING_METRIC, TokenRates
from powercap import kube, physics
from powercap.objects import RACK_LABEL
from powercap.runtime.cliargs import label_key, node_name, watts
from powercap.runtime.httpserver import HttpServer

log = logging.getLogger(__name__)

DEFAULT_METRICS_BIND = "0.0.0.0:9402"
SIMULATED_GPUS_ENV = "POWERCAP_SIMULATED_GPUS"
SIMULATED_MODEL_ENV = "POWERCAP_SIMULATED_GPU_MODEL"
SIMULATED_WORKLOAD_ENV = "POWERCAP_SIMULATED_WORKLOAD"
EXIT_OK, EXIT_GPU, EXIT_CONFIG = 0, 1, 2


def bind_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[::1]:PORT``; argparse ``type=``."""
    host, separator, port = text.rpartition(":")
    if not separator or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 0.0.0.0:9402")
    return host.strip("[]") or "0.0.0.0", int(port)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds in (0, 3600]")
    return value


def path_or_none(text: str) -> Path | None:
    """argparse type of a path that 'none' switches off."""
    return None if text.strip().lower() == "none" else Path(text)


def socket_or_none(text: str) -> Path | None:
    """argparse type of --pod-resources-socket: a path, or 'none'."""
    if text.strip().lower() == "none":
        return None
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a socket path or 'none'")
    return Path(text)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="enforce per-GPU power caps on this node (NVML)",
        description="The node agent: reads every GPU, maps GPUs to pods and policies, sets power "
        "limits through NVML, publishes node telemetry. See docs/nodeagent.md.",
    )
    parser.add_argument("--node", default=os.environ.get("NODE_NAME") or socket.gethostname(), type=node_name,
                        help="this node's name (default: $NODE_NAME, else the host name)")
    parser.add_argument("--backend", choices=("nvml", "simulated"), default="nvml",
                        help=f"GPUs through NVML, or simulated GPUs (${SIMULATED_GPUS_ENV}, default 4, of "
                             f"${SIMULATED_MODEL_ENV}: {' or '.join(physics.PRESETS)}, default {physics.H200_LIKE.name}) "
                             f"whose UUIDs are {simulated_uuid_prefix('NODE')}-0000 ...; busy at 80 %% load, or "
                             f"as the JSON file ${SIMULATED_WORKLOAD_ENV} says: docs/nodeagent.md)")
    parser.add_argument("--policy", type=Path, metavar="FILE",
                        help="run without Kubernetes: every local GPU belongs to this PowerCappingPolicy")
    parser.add_argument("--rack-label", default=RACK_LABEL, type=label_key, metavar="KEY",
                        help=f"node label whose value is this node's rack, for its rack's maxInletTemperature "
                             f"(default {RACK_LABEL}; the extender's and controller's --rack-label)")
    parser.add_argument("--interval", type=positive_seconds, default=1.0, metavar="SECONDS",
                        help="control tick period (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="compute and report caps, never set one")
    parser.add_argument("--state-file", type=Path, default=DEFAULT_STATE_FILE, metavar="PATH",
                        help=f"which GPUs the agent capped, kept across restarts (default {DEFAULT_STATE_FILE})")
    parser.add_argument("--metrics-bind", type=bind_address, default=DEFAULT_METRICS_BIND, metavar="HOST:PORT",
                        help=f"/metrics, /healthz and /status (default {DEFAULT_METRICS_BIND}; port 0: any)")
    parser.add_argument("--restore-on-exit", action="store_true",
                        help="on SIGTERM give every capped GPU its default limit back (default: keep caps)")
    parser.add_argument("--inlet", type=inlet_spec_argument, default=NoInlet(), metavar="SPEC",
                        help="inlet temperature: 'hwmon:<label>', 'file:<path>' or 'none' (default)")
    parser.add_argument("--pod-resources-socket", type=socket_or_none, default=DEFAULT_SOCKET, metavar="PATH",
                        help="the kubelet's pod-resources socket, to map GPUs to the pods they were given to before "
                             "those run a process on them ('none': by processes only; default: %(default)s)")
    parser.add_argument("--gpu-resource", action="append", metavar="NAME", dest="gpu_resources",
                        help="extended resource whose device IDs name GPUs in the pod-resources API "
                             f"(repeatable; default: {', '.join(DEFAULT_GPU_RESOURCES)})")
    parser.add_argument("--tokens-metric", default=DEFAULT_TOKENS_METRIC, metavar="NAME",
                        help=f"generated-tokens counter on each pod's metrics endpoint (default {DEFAULT_TOKENS_METRIC})")
    parser.add_argument("--waiting-metric", default=DEFAULT_WAITING_METRIC, metavar="NAME",
                        help="requests-waiting gauge on each pod's metrics endpoint, read from the same scrape; a pod "
                             f"with requests waiting counts as saturated (default {DEFAULT_WAITING_METRIC})")
    power = parser.add_argument_group("whole-node power (docs/nodeagent.md, Node power)")
    power.add_argument("--node-power", type=sources_argument, default=(), metavar="SOURCES",
                       help="measured sources in priority order, comma-separated: redfish, ipmi-dcmi, kepler; the "
                            "estimate (GPUs + --node-power-overhead-w) always comes last (default: the estimate only)")
    power.add_argument("--node-power-overhead-w", type=watts, default=0.0, metavar="WATTS",
                       help="the node's power beside its GPUs, for the estimate (default 0)")
    power.add_argument("--node-power-config", type=Path, metavar="FILE",
                       help="per-node settings (a mounted ConfigMap): 'default' and 'nodes.<node>' sections override "
                            "these flags; a missing file overrides nothing")
    power.add_argument("--node-power-interval", type=positive_seconds, default=5.0, metavar="SECONDS",
                       help="seconds between two reads of each source (default 5)")
    power.add_argument("--node-power-timeout", type=positive_seconds, default=2.0, metavar="SECONDS",
                       help="limit of one read (default 2)")
    power.add_argument("--node-power-max-age", type=positive_seconds, default=15.0, metavar="SECONDS",
                       help="an older reading is not used: the next source is (default 15)")
    power.add_argument("--redfish-url", metavar="URL", help="the BMC's Redfish service, https://HOST[:PORT]")
    power.add_argument("--redfish-chassis", metavar="ID", help="the chassis to read (default: the first with a reading)")
    power.add_argument("--redfish-ca-file", type=Path, metavar="PATH", help="CA bundle that signed the BMC's certificate")
    power.add_argument("--redfish-insecure", action="store_true",
                       help="do not verify the BMC's certificate (logged as a warning)")
    power.add_argument("--redfish-auth", choices=("basic", "session"), default="basic",
                       help="HTTP basic auth on every request, or a Redfish session (default basic)")
    power.add_argument("--redfish-credentials", type=path_or_none, default=DEFAULT_CREDENTIALS_DIR, metavar="DIR",
                       help="directory holding the files 'username' and 'password' (a kubernetes.io/basic-auth "
                            "Secret; 'none': no authentication; default %(default)s)")
    power.add_argument("--kepler-url", default=DEFAULT_KEPLER_URL, metavar="URL",
                       help="Kepler's metrics endpoint (default %(default)s)")
    power.add_argument("--ipmitool", default="ipmitool", metavar="PATH", help="the ipmitool command (default ipmitool)")
    parser.set_defaults(func=run)


def node_power_settings(args: argparse.Namespace) -> NodePowerSettings:
    """The node power settings of the flags and ``--node-power-config`` for ``args.node``;
    :class:`NodePowerConfigError` when they cannot work."""
    flags = NodePowerSettings(
        sources=args.node_power, overhead_w=args.node_power_overhead_w, interval_s=args.node_power_interval,
        timeout_s=args.node_power_timeout, max_age_s=args.node_power_max_age, redfish_url=args.redfish_url,
        redfish_chassis=args.redfish_chassis, redfish_ca_file=args.redfish_ca_file,
        redfish_insecure=args.redfish_insecure, redfish_session=args.redfish_auth == "session",
        redfish_credentials_dir=args.redfish_credentials, kepler_url=args.kepler_url, ipmitool=args.ipmitool,
    )
    return load_settings(args.node_power_config, args.node, flags)


def simulated_uuid_prefix(node: str) -> str:
    """The simulated GPUs' UUID prefix on ``node``: unique per node, as real GPU UUIDs are,
    so that a cluster of simulated nodes (scripts/local-cluster.sh) publishes no duplicates."""
    return f"GPU-sim-{node}"


def open_backend(kind: str, node: str) -> GpuBackend:
    """The GPU backend a ``--backend`` value names; raises GpuError when NVML cannot start
    and ValueError for a simulated GPU count or model that does not exist."""
    if kind == "simulated":
        from nodeagent.simulated import SimulatedBackend

        raw_count = os.environ.get(SIMULATED_GPUS_ENV, "4")
        if not raw_count.isdigit() or not 1 <= int(raw_count) <= 64:
            raise ValueError(f"${SIMULATED_GPUS_ENV}: {raw_count!r} is not a GPU count from 1 to 64")
        model_name = os.environ.get(SIMULATED_MODEL_ENV, physics.H200_LIKE.name)
        if model_name not in physics.PRESETS:
            raise ValueError(f"${SIMULATED_MODEL_ENV}: unknown GPU model {model_name!r}; "
                             f"models: {', '.join(physics.PRESETS)}")
        count = int(raw_count)
        backend = SimulatedBackend([physics.PRESETS[model_name]] * count, clock=time.monotonic,
                                   uuid_prefix=simulated_uuid_prefix(node))
        workload_file = os.environ.get(SIMULATED_WORKLOAD_ENV)
        if workload_file:
            backend.follow_workload_file(Path(workload_file))
        else:
            for index in range(count):
                backend.set_workload(index, physics.Workload(load=0.8, prefill_share=0.2))
        return backend
    from nodeagent.nvml import NvmlBackend

    return NvmlBackend()


def _fail(message: str, code: int) -> int:
    log.error(message)
    print(f"powercap agent: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        backend = open_backend(args.backend, args.node)
    except GpuError as error:
        return _fail(f"cannot start the {args.backend} backend: {error}", EXIT_GPU)
    except ValueError as error:
        return _fail(str(error), EXIT_CONFIG)
    source: PolicySource
    publisher: Publisher
    try:
        if args.policy is not None:
            source = FilePolicySource(args.policy, args.node)
            publisher = NullPublisher()
        else:
            client = kube.KubeClient.from_environment(connect_timeout_s=2.0, read_timeout_s=10.0)
            source = ClusterSource(client, args.node, rack_label=args.rack_label)
            publisher = KubePublisher(client, args.node)
    except (PolicyFileError, kube.KubeConfigError) as error:
        backend.close()
        return _fail(str(error), EXIT_CONFIG)
    inlet: InletSource = args.inlet
    metrics = AgentMetrics()
    try:
        node_power = build_sampler(node_power_settings(args), NodePowerMetrics(metrics.registry))
    except NodePowerConfigError as error:
        backend.close()
        return _fail(str(error), EXIT_CONFIG)
    tokens = TokenRates(metric=args.tokens_metric, waiting_metric=args.waiting_metric)
    settings = AgentSettings(node=args.node, interval_s=args.interval, dry_run=args.dry_run)
    pod_resources = (
        PodResourcesSource(args.pod_resources_socket, args.gpu_resources or DEFAULT_GPU_RESOURCES)
        if args.pod_resources_socket is not None and args.policy is None else None
    )
    agent = Agent(
        backend,
        source,
        settings,
        publisher=publisher,
        state=StateFile(args.state_file, args.node),
        tokens=tokens,
        inlet=inlet,
        metrics=metrics,
        pod_resources=pod_resources,
        node_power=node_power,
    )
    host, port = args.metrics_bind
    try:
        server = HttpServer(host, port, agent_routes(metrics, agent.healthy, agent.status), name="metrics-server")
    except OSError as error:
        agent.close()
        return _fail(f"--metrics-bind {host}:{port}: {error}", EXIT_CONFIG)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    source.start()
    publisher.start()
    tokens.start()
    node_power.start()
    log.info("agent running", extra={"metrics_port": server.port, "interval_s": args.interval, "node": args.node})
    agent.run(stop)
    agent.close(restore=args.restore_on_exit)
    server.stop()
    return EXIT_OK
