"""The ``powercap`` command: one entry point for every program and tool.

Subcommands are registered through the ``powercap.commands`` entry-point group (see
pyproject.toml): ``webhook``, ``certs``, ``extender``, ``controller`` and ``agent`` from
each program's ``cli.py``, ``simulate`` from :mod:`powercap.simulation.cli` and
``validate`` from :mod:`powercap.commands.validate`. This module imports none of them, so
a program's dependencies load only when its command runs.
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
    try:
        parser = build_parser()  # imports every command's module: a noticeable moment
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("powercap: interrupted before the command started; nothing done", file=sys.stderr)
        return 130
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
