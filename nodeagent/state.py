"""The host state file: which GPUs the agent capped, to what, for which policy.

It lives on the host (``/var/lib/powercap/agent-state.json``, a hostPath in the
DaemonSet) so that a restarted agent neither thrashes (it adopts the caps and control
state it had) nor forgets (a GPU that left every policy while the agent was down still
gets its default limit back). Format, version 1::

    {"version": 1, "node": "gpu-node-1",
     "gpus": {"GPU-8d3c...": {"capW": 400, "defaultW": 700, "policy": "inference/llama",
                              "ratioOffsetW": 0, "thermalLimitW": null}}}

Written atomically: a temporary file in the same directory, fsync, ``os.replace``; a
crash leaves the old file or the new one, never half of one. Written only when its
content changes. An unreadable or corrupt file is logged and read as empty (the agent
then adopts what it finds and cannot restore GPUs it no longer knows it capped).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from powercap.agentplan import CapRecord
from powercap.numeric import is_finite_number

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_STATE_FILE = Path("/var/lib/powercap/agent-state.json")


def records_to_document(node: str, records: Mapping[str, CapRecord]) -> dict[str, Any]:
    return {
        "version": VERSION,
        "node": node,
        "gpus": {
            uuid: {
                "capW": record.cap_w,
                "defaultW": record.default_w,
                "policy": record.policy,
                "ratioOffsetW": record.ratio_offset_w,
                "thermalLimitW": record.thermal_limit_w,
            }
            for uuid, record in sorted(records.items())
        },
    }


def records_from_document(document: Any) -> dict[str, CapRecord]:
    """The records of a parsed state file; ``ValueError`` naming what is wrong."""
    if not isinstance(document, Mapping) or document.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} state file")
    gpus = document.get("gpus")
    if not isinstance(gpus, Mapping):
        raise ValueError("gpus must be an object")
    records = {}
    for uuid, raw in gpus.items():
        try:
            thermal = raw.get("thermalLimitW")
            records[uuid] = CapRecord(
                uuid=str(uuid),
                cap_w=_watts(raw["capW"], "capW"),
                default_w=_watts(raw["defaultW"], "defaultW"),
                policy=str(raw["policy"]),
                ratio_offset_w=_watts(raw.get("ratioOffsetW") or 0.0, "ratioOffsetW"),
                thermal_limit_w=None if thermal is None else _watts(thermal, "thermalLimitW"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"gpus.{uuid}: {error!r}") from error
    return records


def _watts(value: Any, name: str) -> float:
    """A record's watts: a finite number (an integer of 400 digits, NaN or an infinity is a
    corrupt file, not a cap to write)."""
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, not {str(value)[:40]}")
    return float(value)


class StateFile:
    """Load and save the records at ``path``; ``None`` path keeps them in memory only."""

    def __init__(self, path: Path | None, node: str) -> None:
        self.path = path
        self.node = node
        self._saved: dict[str, Any] | None = None

    def load(self) -> dict[str, CapRecord]:
        if self.path is None:
            return {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            log.info("no state file yet: nothing to adopt", extra={"state_file": str(self.path)})
            return {}
        except OSError as error:
            log.error("state file unreadable: starting empty", extra={"state_file": str(self.path), "error": str(error)})
            return {}
        try:
            records = records_from_document(json.loads(text))
        except (ValueError, RecursionError) as error:  # RecursionError: JSON nested past Python's stack
            log.error("state file corrupt: starting empty", extra={"state_file": str(self.path), "error": str(error)})
            return {}
        self._saved = records_to_document(self.node, records)
        log.info("state file loaded", extra={"state_file": str(self.path), "gpus_recorded": len(records)})
        return records

    def save(self, records: Mapping[str, CapRecord]) -> bool:
        """Write the records when they changed; True when the file was written.

        Raises ``OSError`` when the write fails (the caller logs and retries next tick).
        """
        document = records_to_document(self.node, records)
        if self.path is None or document == self._saved:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w") as stream:
                json.dump(document, stream, indent=1)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._saved = document
        return True
