"""argparse ``type=`` functions shared by the programs' command lines.

Each raises :class:`argparse.ArgumentTypeError` with a message that names what is wrong,
which argparse prints as ``argument --flag: <message>`` and exits 2.
"""

from __future__ import annotations

import argparse

from powercap.clusterviews import ClusterSettings
from powercap.nodepower import MAX_PLAUSIBLE_W
from powercap.objects import RACK_LABEL
from powercap.policies import is_dns1123_label, is_dns1123_subdomain, label_key_problem
from powercap.telemetry import DEFAULT_STALE_AFTER_S

LOG_LEVELS = ("debug", "info", "warning", "error")


def positive_seconds(text: str) -> float:
    """argparse ``type=``: a finite number of seconds greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _integer_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number of at least 1."""
    return _integer_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse ``type=``: a whole number of at least 0."""
    return _integer_at_least(text, 0)


def dns_label(text: str) -> str:
    """argparse ``type=``: a Kubernetes name such as a namespace or a Service's."""
    if not is_dns1123_label(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Kubernetes name (a-z, 0-9 and '-', at most 63 characters)")
    return text


def node_name(text: str) -> str:
    """argparse ``type=``: a Node's name; lowercased, as the kubelet names a Node after its
    host name."""
    name = text.strip().lower()
    if not is_dns1123_subdomain(name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Node name (a-z, 0-9, '-' and '.', at most 253 characters)")
    return name


def bind_address(text: str) -> str:
    """argparse ``type=``: ``HOST:PORT`` with a port in 0..65535 (0: any free port;
    ``[::1]:PORT`` for IPv6)."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (a port in 0..65535)")
    return text


def label_key(text: str) -> str:
    """argparse ``type=``: a label key such as ``powercapping.example.com/rack``."""
    problem = label_key_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="least severe log line written, as JSON on stderr (default: info)")


def watts(text: str) -> float:
    """argparse ``type=``: watts in [0, 100000] (no one server draws more)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_PLAUSIBLE_W:
        raise argparse.ArgumentTypeError(f"{text!r}: expected watts in [0, {MAX_PLAUSIBLE_W:.0f}]")
    return value


def rise_fraction(text: str) -> float:
    """argparse ``type=``: watts per watt in [0, 2]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected watts per watt in [0, 2]")
    return value


def add_cluster_view_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every program that builds a cluster view: ``--rack-label``,
    ``--stale-after``, ``--node-overhead-w``, ``--non-gpu-rise`` (read back by
    :func:`cluster_view_settings`)."""
    parser.add_argument("--rack-label", default=RACK_LABEL, type=label_key, metavar="KEY",
                        help=f"node label whose value is the rack id (default {RACK_LABEL})")
    parser.add_argument("--stale-after", default=DEFAULT_STALE_AFTER_S, type=positive_seconds, metavar="SECONDS",
                        help=f"node telemetry (and a node's whole-node power reading) older than this is stale "
                             f"(default {DEFAULT_STALE_AFTER_S:g})")
    parser.add_argument("--node-overhead-w", default=0.0, type=watts, metavar="WATTS",
                        help="power beside its GPUs counted for a GPU node without a fresh, plausible whole-node "
                             "reading (at least what its agent's estimate says), W (default 0: GPUs only)")
    parser.add_argument("--non-gpu-rise", default=ClusterSettings.non_gpu_rise, type=rise_fraction, metavar="W_PER_W",
                        help="watts a node's measured power beside its GPUs rises per watt its GPUs rise, provisioned "
                             f"by the filter and the rack fill (default {ClusterSettings.non_gpu_rise:g})")


def cluster_view_settings(args: argparse.Namespace) -> ClusterSettings:
    """The cluster view's settings from :func:`add_cluster_view_arguments`' flags."""
    return ClusterSettings(rack_label=args.rack_label, stale_after_s=args.stale_after,
                           node_overhead_w=args.node_overhead_w, non_gpu_rise=args.non_gpu_rise)
