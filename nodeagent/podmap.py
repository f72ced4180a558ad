"""GPU -> pod mapping: NVML compute PIDs -> ``/proc/<pid>/cgroup`` -> pod UID.

NVML reports host PIDs, so the agent runs with ``hostPID: true`` and reads the host's
``/proc`` (the root is injectable: tests use a tmp tree). The kubelet names every pod's
cgroup after the pod UID; the shapes understood here:

- systemd cgroup driver: ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid with _ for ->.slice/cri-containerd-<id>.scope``
  (guaranteed pods sit directly under ``kubepods.slice`` as ``kubepods-pod<uid>.slice``;
  CRI-O names the container ``crio-<id>.scope``; a custom kubelet cgroup root such as
  kind's adds a prefix: ``kubelet-kubepods-besteffort-pod<uid>.slice``);
- cgroupfs driver: ``/kubepods/burstable/pod<uid>/<container id>`` (guaranteed:
  ``/kubepods/pod<uid>/<id>``);
- cgroup v1 (one line per hierarchy, ``12:memory:/kubepods/...``) and v2 (``0::/...``),
  including the relative ``/../..`` paths a private cgroup namespace shows, and
  containerd's ``kubepods-...-pod<uid>.slice:cri-containerd:<id>`` form.

Static pods carry a 32-hex-digit UID (the config hash) instead of a dashed one.
Everything is a pure function on text except :func:`read_pod_cgroup`; a process outside
any pod (host daemons, ``/user.slice``, plain docker) maps to None, not an exception.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
_SYSTEMD_POD = re.compile(
    r"(?:[\w.]+-)?kubepods(?:-(?P<qos>burstable|besteffort))?-pod(?P<uid>[0-9a-f_]+)\.slice"
)
_CGROUPFS_POD = re.compile(r"pod(?P<uid>[0-9a-f-]+)")
_CONTAINER = re.compile(
    r"(?:cri-containerd-|crio-|docker-|containerd-)?(?P<id>[0-9a-f]{12,64})(?:\.scope)?"
)
_QOS_CLASSES = ("burstable", "besteffort")


@dataclass(frozen=True, slots=True)
class PodCgroup:
    """Where a process sits: its pod's UID, QoS class and container ID (None if unknown)."""

    pod_uid: str
    qos: str
    container_id: str | None


def _container_id(segment: str | None) -> str | None:
    match = _CONTAINER.fullmatch(segment) if segment else None
    return match.group("id") if match else None


def _valid_uid(raw: str) -> str | None:
    uid = raw.replace("_", "-")
    return uid if _UID.fullmatch(uid) else None


def parse_cgroup_path(path: str) -> PodCgroup | None:
    """The pod of one cgroup path, or None when the path is not inside a pod."""
    segments = [s for s in path.split("/") if s and s != ".."]
    for position, segment in enumerate(segments):
        after = segments[position + 1] if position + 1 < len(segments) else None
        slice_name, _, inline_container = segment.partition(":cri-containerd:")
        systemd = _SYSTEMD_POD.fullmatch(slice_name)
        if systemd:
            uid = _valid_uid(systemd.group("uid"))
            if uid:
                return PodCgroup(
                    pod_uid=uid,
                    qos=systemd.group("qos") or "guaranteed",
                    container_id=_container_id(inline_container or after),
                )
        cgroupfs = _CGROUPFS_POD.fullmatch(segment)
        parents = segments[max(0, position - 2) : position]
        if cgroupfs and "kubepods" in parents:
            uid = _valid_uid(cgroupfs.group("uid"))
            qos = parents[-1] if parents[-1] in _QOS_CLASSES else "guaranteed"
            if uid:
                return PodCgroup(pod_uid=uid, qos=qos, container_id=_container_id(after))
    return None


def parse_cgroup(text: str) -> PodCgroup | None:
    """The pod of a ``/proc/<pid>/cgroup`` file (v1 or v2): the first line inside a pod.

    Each line is ``hierarchy-id:controllers:path``; the path may itself contain ``:``.
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            found = parse_cgroup_path(parts[2])
            if found:
                return found
    return None


def read_pod_cgroup(pid: int, proc_root: Path = Path("/proc")) -> PodCgroup | None:
    """The pod of a running process, or None (host process, or gone/unreadable: logged)."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError as error:
        log.debug("cannot read cgroup of process", extra={"pid": pid, "error": str(error)})
        return None
    return parse_cgroup(text)


def pod_uid_for_pid(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The UID of the pod a process runs in, or None for a process outside any pod."""
    found = read_pod_cgroup(pid, proc_root)
    return found.pod_uid if found else None


def pod_uids_for_pids(pids: Iterable[int], proc_root: Path = Path("/proc")) -> frozenset[str]:
    """The pods behind a GPU's compute PIDs (usually one; empty when only host processes)."""
    uids = (pod_uid_for_pid(pid, proc_root) for pid in pids)
    return frozenset(uid for uid in uids if uid)
