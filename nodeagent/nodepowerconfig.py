"""Which node power sources an agent reads, from its flags and a per-node config file.

The flags (``--node-power`` and friends, docs/nodeagent.md) set what every node does; the
file given by ``--node-power-config`` (a ConfigMap mounted into the DaemonSet) changes it
for all nodes (``default``) and for single nodes (``nodes.<node name>``), each key
overriding the one before::

    default:
      sources: [kepler]            # priority order; the estimate always comes last
      overheadW: 1500              # W beside the GPUs, for the estimate
    nodes:
      gpu-node-17:
        sources: [redfish, ipmi-dcmi]
        redfishURL: https://10.20.0.17
        redfishChassis: "1"        # optional: else the first chassis with a reading
        overheadW: 1800

Keys: ``sources``, ``overheadW``, ``redfishURL``, ``redfishChassis``, ``keplerURL``.
A missing file is no override (the ConfigMap volume is optional); a file that cannot be
read or holds a bad value stops the agent at start-up, every problem named with its path
(``nodes.gpu-node-17.sources[1]: unknown source 'bmc'``). The file is read once, at
start-up: restart the DaemonSet after changing it.
"""

from __future__ import annotations

import argparse
import shutil
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nodeagent.nodepower import (
    DEFAULT_KEPLER_URL,
    BasicAuthFiles,
    IpmiDcmiSource,
    KeplerSource,
    NodePowerMetricsSink,
    NodePowerSampler,
    PowerSource,
    RedfishSource,
    bmc_tls_context,
)
from powercap.nodepower import ESTIMATE, IPMI_DCMI, KEPLER, MEASURED_SOURCES, REDFISH
from powercap.numeric import is_finite_number
from powercap.runtime.documents import LOAD_ERRORS, describe_load_error, parse_documents, read_text

DEFAULT_CREDENTIALS_DIR = Path("/etc/powercap/bmc")
FILE_KEYS = {"sources": "sources", "overheadW": "overhead_w", "redfishURL": "redfish_url",
             "redfishChassis": "redfish_chassis", "keplerURL": "kepler_url"}


class NodePowerConfigError(ValueError):
    """Node power configuration that cannot work (stop at start-up)."""


@dataclass(frozen=True)
class NodePowerSettings:
    """How this node's power is read; ``sources`` are the measured ones in priority order."""

    sources: tuple[str, ...] = ()
    overhead_w: float = 0.0
    interval_s: float = 5.0
    timeout_s: float = 2.0
    max_age_s: float = 15.0
    redfish_url: str | None = None
    redfish_chassis: str | None = None
    redfish_ca_file: Path | None = None
    redfish_insecure: bool = False
    redfish_session: bool = False
    redfish_credentials_dir: Path | None = DEFAULT_CREDENTIALS_DIR
    kepler_url: str = DEFAULT_KEPLER_URL
    ipmitool: str = "ipmitool"


def parse_sources(items: Any, where: str) -> tuple[str, ...]:
    """Measured source names in priority order; ``estimate`` may close the list (it always
    does, implicitly)."""
    if isinstance(items, str):
        items = [item.strip() for item in items.split(",") if item.strip()]
    if not isinstance(items, list):
        raise NodePowerConfigError(f"{where}: expected a list of sources")
    problems, sources = [], []
    for position, item in enumerate(items):
        if item == ESTIMATE and position == len(items) - 1:
            continue
        if item not in MEASURED_SOURCES:
            expected = ", ".join(MEASURED_SOURCES)
            problems.append(f"{where}[{position}]: unknown source {item!r} (expected {expected}; {ESTIMATE} only last)")
        elif item in sources:
            problems.append(f"{where}[{position}]: {item} listed twice")
        else:
            sources.append(item)
    if problems:
        raise NodePowerConfigError("; ".join(problems))
    return tuple(sources)


def sources_argument(text: str) -> tuple[str, ...]:
    """``argparse`` ``type=`` of ``--node-power``: ``redfish,kepler``."""
    try:
        return parse_sources(text, "--node-power")
    except NodePowerConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def overrides(section: Any, where: str) -> dict[str, Any]:
    """The settings a ``default`` or ``nodes.<node>`` section sets, as field -> value."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise NodePowerConfigError(f"{where}: expected a mapping")
    problems: list[str] = []
    found: dict[str, Any] = {}
    for key, value in section.items():
        path = f"{where}.{key}"
        if key not in FILE_KEYS:
            problems.append(f"{path}: unknown key (expected {', '.join(FILE_KEYS)})")
        elif key == "sources":
            try:
                found["sources"] = parse_sources(value, path)
            except NodePowerConfigError as error:
                problems.append(str(error))
        elif key == "overheadW":
            if not is_finite_number(value) or value < 0:
                problems.append(f"{path}: expected watts >= 0")
            else:
                found["overhead_w"] = float(value)
        elif not isinstance(value, str) or not value.strip():
            problems.append(f"{path}: expected a non-empty string")
        else:
            found[FILE_KEYS[key]] = value.strip()
    if problems:
        raise NodePowerConfigError("; ".join(problems))
    return found


def settings_for_node(document: Any, node: str, base: NodePowerSettings) -> NodePowerSettings:
    """``base`` (the flags) with the file's ``default`` and then ``nodes.<node>`` applied."""
    if document is None:
        return base
    if not isinstance(document, Mapping):
        raise NodePowerConfigError("expected a mapping with 'default' and/or 'nodes'")
    unknown = sorted(set(document) - {"default", "nodes"})
    if unknown:
        raise NodePowerConfigError(f"{unknown[0]}: unknown key (expected default, nodes)")
    nodes = document.get("nodes") or {}
    if not isinstance(nodes, Mapping):
        raise NodePowerConfigError("nodes: expected a mapping of node name to settings")
    problems = []
    applied = base
    for where, section in (("default", document.get("default")), *((f"nodes.{name}", s) for name, s in nodes.items())):
        try:
            found = overrides(section, where)  # every node's section is checked, not only ours
        except NodePowerConfigError as error:
            problems.append(str(error))
            continue
        if where in ("default", f"nodes.{node}"):
            applied = replace(applied, **found)
    if problems:
        raise NodePowerConfigError("; ".join(problems))
    return applied


def load_settings(path: Path | None, node: str, base: NodePowerSettings) -> NodePowerSettings:
    """The settings for ``node`` from the flags and the file at ``path`` (module docstring)."""
    if path is None or not path.exists():
        return check_settings(base)
    try:
        documents = list(parse_documents(read_text(str(path))))
    except LOAD_ERRORS as error:
        raise NodePowerConfigError(f"{path}: {describe_load_error(error)}") from None
    if len(documents) > 1:
        raise NodePowerConfigError(f"{path}: expected one document, found {len(documents)}")
    try:
        return check_settings(settings_for_node(documents[0] if documents else None, node, base))
    except NodePowerConfigError as error:
        raise NodePowerConfigError(f"{path}: {error}") from None


def check_settings(settings: NodePowerSettings) -> NodePowerSettings:
    """Refuse settings that cannot work: Redfish without an https URL."""
    if REDFISH in settings.sources:
        if not settings.redfish_url:
            raise NodePowerConfigError("redfish needs a BMC URL (--redfish-url, or redfishURL in the config file)")
        if not settings.redfish_url.startswith("https://"):
            raise NodePowerConfigError(f"redfish URL {settings.redfish_url!r}: only https (credentials ride on each request)")
    return settings


def build_sampler(settings: NodePowerSettings, metrics: NodePowerMetricsSink | None = None) -> NodePowerSampler:
    """The sampler reading ``settings.sources`` in order (the threads start with
    :meth:`NodePowerSampler.start`); :class:`NodePowerConfigError` for a CA file that
    cannot be loaded or an ipmitool that is not there."""
    sources: list[PowerSource] = []
    for name in settings.sources:
        if name == REDFISH:
            assert settings.redfish_url is not None  # check_settings
            credentials = BasicAuthFiles(settings.redfish_credentials_dir) if settings.redfish_credentials_dir else None
            try:
                tls = bmc_tls_context(settings.redfish_ca_file, insecure=settings.redfish_insecure)
            except (OSError, ssl.SSLError) as error:
                raise NodePowerConfigError(f"--redfish-ca-file {settings.redfish_ca_file}: {error}") from None
            sources.append(RedfishSource(settings.redfish_url, credentials, tls, chassis_id=settings.redfish_chassis,
                                         session_auth=settings.redfish_session, timeout_s=settings.timeout_s))
        elif name == IPMI_DCMI:
            if shutil.which(settings.ipmitool) is None:
                raise NodePowerConfigError(f"ipmi-dcmi needs ipmitool: {settings.ipmitool!r} not found")
            sources.append(IpmiDcmiSource(settings.ipmitool, timeout_s=settings.timeout_s))
        elif name == KEPLER:
            sources.append(KeplerSource(settings.kepler_url, timeout_s=settings.timeout_s))
    return NodePowerSampler(sources, overhead_w=settings.overhead_w, interval_s=settings.interval_s,
                            max_age_s=settings.max_age_s, metrics=metrics)
