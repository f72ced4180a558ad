"""The ``powercap`` command.

Subcommands are registered through the ``powercap.commands`` entry-point group (see
pyproject.toml): each service package contributes its own, so this module, part of the
pure core, never imports a service package.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from powercap import __version__

COMMAND_GROUP = "powercap.commands"


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
    from powercap.policies import is_dns1123_label

    if not is_dns1123_label(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Kubernetes name (a-z, 0-9 and '-', at most 63 characters)")
    return text


def node_name(text: str) -> str:
    """argparse ``type=``: a Node's name; lowercased, as the kubelet names a Node after its
    host name."""
    from powercap.policies import is_dns1123_subdomain

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="powercap",
        description="GPU power capping for LLM inference on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"powercap {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry_point in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name):
        register = entry_point.load()
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (powercap ... | head): stop quietly, as a killed-by-SIGPIPE
        # program would, and keep Python from failing again while flushing stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
