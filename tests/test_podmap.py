"""GPU -> pod mapping from /proc/<pid>/cgroup samples as real nodes write them."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.podmap import (
    PodCgroup,
    parse_cgroup,
    pod_uid_for_pid,
    pod_uids_for_pids,
)

UID = "0b9b9a0e-5c3f-4d0c-9d1a-2b3c4d5e6f70"
UID_ = UID.replace("-", "_")
STATIC_UID = "2c5b1f3a9d8e7f6a5b4c3d2e1f0a9b8c"
CID = "3f1e0d7a9b2c4e6f8a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f"

V1_CGROUPFS_DOCKER = f"""\
12:pids:/kubepods/burstable/pod{UID}/{CID}
11:memory:/kubepods/burstable/pod{UID}/{CID}
10:devices:/kubepods/burstable/pod{UID}/{CID}
4:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}
1:name=systemd:/kubepods/burstable/pod{UID}/{CID}
0::/
"""

SYSTEMD_BESTEFFORT = (
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
    f"cri-containerd-{CID}.scope"
)
V1_SYSTEMD_CONTAINERD = f"""\
13:misc:/
12:memory:{SYSTEMD_BESTEFFORT}
1:name=systemd:{SYSTEMD_BESTEFFORT}
"""

V1_CONTAINERD_SERVICE = (
    "12:freezer:/\n1:name=systemd:/system.slice/containerd.service/"
    f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope\n",
            PodCgroup(UID, "burstable", CID),
            id="v2-systemd-containerd-burstable",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
            PodCgroup(UID, "guaranteed", CID),
            id="v2-systemd-containerd-guaranteed",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
            f"crio-{CID}.scope\n",
            PodCgroup(UID, "besteffort", CID),
            id="v2-systemd-crio-besteffort",
        ),
        pytest.param(
            f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
            PodCgroup(UID, "besteffort", CID),
            id="v2-kind-kubelet-cgroup-root",
        ),
        pytest.param(
            f"0::/../../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope\n",
            PodCgroup(UID, "burstable", CID),
            id="v2-seen-from-private-cgroup-namespace",
        ),
        pytest.param(
            f"0::/kubepods/besteffort/pod{UID}/{CID}\n",
            PodCgroup(UID, "besteffort", CID),
            id="v2-cgroupfs-besteffort",
        ),
        pytest.param(
            f"0::/kubepods/pod{UID}/crio-{CID}\n",
            PodCgroup(UID, "guaranteed", CID),
            id="v2-cgroupfs-crio-guaranteed",
        ),
        pytest.param(
            V1_CGROUPFS_DOCKER, PodCgroup(UID, "burstable", CID), id="v1-cgroupfs-docker"
        ),
        pytest.param(
            V1_SYSTEMD_CONTAINERD, PodCgroup(UID, "besteffort", CID), id="v1-systemd-containerd"
        ),
        pytest.param(
            V1_CONTAINERD_SERVICE,
            PodCgroup(UID, "burstable", CID),
            id="v1-containerd-service-inline-container",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope\n",
            PodCgroup(STATIC_UID, "burstable", CID),
            id="static-pod-hash-uid",
        ),
        pytest.param(
            f"0::/kubepods/burstable/pod{UID}\n",
            PodCgroup(UID, "burstable", None),
            id="pod-level-cgroup-no-container",
        ),
    ],
)
def test_pod_processes_map_to_their_pod(text: str, expected: PodCgroup) -> None:
    assert parse_cgroup(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0::/system.slice/nvidia-persistenced.service\n", id="host-daemon"),
        pytest.param("0::/user.slice/user-1000.slice/session-3.scope\n", id="ssh-session"),
        pytest.param("0::/init.scope\n", id="init"),
        pytest.param("0::/\n", id="root"),
        pytest.param(
            f"12:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n", id="plain-docker"
        ),
        pytest.param("0::/kubepods.slice/kubepods-burstable.slice\n", id="qos-level-only"),
        pytest.param("0::/kubepods/burstable/podnot-a-uid/abc\n", id="malformed-uid"),
        pytest.param(f"0::/home/pod{UID}\n", id="pod-outside-kubepods"),
        pytest.param("", id="empty"),
        pytest.param("garbage without colons\n", id="garbage"),
    ],
)
def test_processes_outside_pods_map_to_none(text: str) -> None:
    assert parse_cgroup(text) is None


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    """A /proc with pod processes 100 and 101, another pod's 200 and a host daemon 300."""
    other_uid = "11111111-2222-3333-4444-555555555555"
    files = {
        100: f"0::/kubepods/burstable/pod{UID}/{CID}\n",
        101: f"0::/kubepods/burstable/pod{UID}/{CID}\n",
        200: f"0::/kubepods/besteffort/pod{other_uid}/{CID}\n",
        300: "0::/system.slice/nvidia-persistenced.service\n",
    }
    for pid, text in files.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("pid", "expected"),
    [
        pytest.param(100, UID, id="pod-process"),
        pytest.param(300, None, id="host-process"),
        pytest.param(999, None, id="process-gone"),
    ],
)
def test_pid_maps_to_pod_uid_through_proc(
    proc_root: Path, pid: int, expected: str | None
) -> None:
    assert pod_uid_for_pid(pid, proc_root) == expected


def test_gpu_pids_map_to_the_set_of_pods(proc_root: Path) -> None:
    assert pod_uids_for_pids([100, 101, 300, 999], proc_root) == {UID}
    assert len(pod_uids_for_pids([100, 200], proc_root)) == 2
    assert pod_uids_for_pids([], proc_root) == frozenset()
