"""`powercap validate`: offline validation of policy files (filled in below)."""
import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="validate PowerCappingPolicy files offline")
    parser.set_defaults(func=lambda args: 0)
