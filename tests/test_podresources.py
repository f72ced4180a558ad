"""GPU -> pod from the kubelet's pod-resources API: the wire format, a real gRPC call over a
unix socket, every failure mapping no GPU, and the agent owning a GPU before its pod runs a
process on it."""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nodeagent.agent import Agent, AgentSettings
from nodeagent.nvml import NvmlBackend
from nodeagent.podresources import DeviceAssignment, PodResourcesError, PodResourcesSource, decode_list_response, pods_by_device
from nodeagent.simulated import ManualClock
from nodeagent.state import StateFile
from tests.agenthelpers import NODE, RecordingPublisher, StaticSource, pod, policy
from tests.fakes.kubelet import FakeKubelet, list_response
from tests.fakes.nvml import FakeNvml

GPU0, GPU1 = "GPU-fa4e0000-0000-4000-8000-000000000000", "GPU-fa4e0000-0000-4000-8000-000000000001"
ASSIGNMENTS = {
    "inference/llama-0": {"server": {"nvidia.com/gpu": [GPU0], "example.com/nic": ["0"]}},
    "inference/llama-1": {"server": {"nvidia.com/gpu": ["1"]}, "sidecar": {}},
    "batch/summarise-0": {"worker": {"example.com/nic": ["1"]}},
}


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    server = FakeKubelet()
    server.assignments = ASSIGNMENTS
    yield server
    server.remove()


def test_the_kubelets_answer_decodes_to_every_containers_devices() -> None:
    data = list_response(ASSIGNMENTS).SerializeToString()
    assert decode_list_response(data) == [
        DeviceAssignment("inference", "llama-0", "server", "nvidia.com/gpu", (GPU0,)),
        DeviceAssignment("inference", "llama-0", "server", "example.com/nic", ("0",)),
        DeviceAssignment("inference", "llama-1", "server", "nvidia.com/gpu", ("1",)),
        DeviceAssignment("batch", "summarise-0", "worker", "example.com/nic", ("1",)),
    ]


def test_only_gpu_resources_name_gpus() -> None:
    """A NIC plugin's device "1" is not GPU 1: only the configured resource names count."""
    assignments = decode_list_response(list_response(ASSIGNMENTS).SerializeToString())
    assert pods_by_device(assignments, {"nvidia.com/gpu"}) == {
        GPU0: frozenset({"inference/llama-0"}),
        "1": frozenset({"inference/llama-1"}),
    }
    assert pods_by_device(assignments, {"example.com/nic"})["1"] == frozenset({"batch/summarise-0"})


def test_an_empty_answer_maps_nothing() -> None:
    assert decode_list_response(b"") == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(b"\x0a", "truncated varint", id="truncated-key-length"),
        pytest.param(b"\x0a\x05ab", "field 1: 5 bytes announced, 2 left", id="length-past-the-end"),
        pytest.param(b"\x0b", "field 1: unsupported wire type 3", id="group"),
        pytest.param(b"\x08\x01", "pod_resources is not a message", id="varint-where-a-message-belongs"),
        pytest.param(b"\x0a\x03\x0a\x01\xff", "PodResources.name is not UTF-8", id="name-not-utf8"),
        pytest.param(b"\x0a\x02\x08" + b"\xff" * 11, "truncated varint", id="overlong-varint"),
    ],
)
def test_bytes_that_are_no_list_response_are_refused_with_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(PodResourcesError, match="^" + problem):
        decode_list_response(data)


def test_a_real_grpc_call_over_the_unix_socket(kubelet: FakeKubelet) -> None:
    kubelet.start()
    source = PodResourcesSource(kubelet.socket_path)
    assert source.pods_by_device() == {GPU0: frozenset({"inference/llama-0"}), "1": frozenset({"inference/llama-1"})}
    kubelet.assignments = {"inference/llama-0": {"server": {"nvidia.com/gpu": [GPU0, GPU1]}}}
    assert source.pods_by_device() == {GPU0: frozenset({"inference/llama-0"}), GPU1: frozenset({"inference/llama-0"})}
    assert kubelet.calls == 2


def test_no_socket_maps_nothing_says_so_once_and_recovers_when_the_kubelet_appears(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture,
) -> None:
    source = PodResourcesSource(kubelet.socket_path)
    caplog.set_level(logging.INFO, logger="nodeagent.podresources")
    assert source.pods_by_device() == {} and source.pods_by_device() == {}
    assert [r.getMessage() for r in caplog.records] == [
        "kubelet pod-resources API unavailable; mapping GPUs to pods by their processes only"
    ]
    assert caplog.records[0].problem == f"socket {kubelet.socket_path} not found"
    kubelet.start()
    assert source.pods_by_device()[GPU0] == frozenset({"inference/llama-0"})
    assert caplog.records[-1].getMessage() == "kubelet pod-resources API answers again"


def test_a_kubelet_without_the_list_method_maps_nothing_with_one_warning(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture,
) -> None:
    kubelet.start(serve_list=False)
    source = PodResourcesSource(kubelet.socket_path)
    assert source.pods_by_device() == {} and source.pods_by_device() == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].problem.startswith("List failed: UNIMPLEMENTED")


def test_an_error_status_or_an_undecodable_answer_maps_nothing(kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture) -> None:
    kubelet.start()
    source = PodResourcesSource(kubelet.socket_path)

    def refuse(context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected by rate limit")
        raise AssertionError("abort raises")

    kubelet.answer = refuse
    assert source.pods_by_device() == {}
    kubelet.answer = lambda context: b"\x0b"
    assert source.pods_by_device() == {}
    kubelet.answer = None
    assert source.pods_by_device()[GPU0] == frozenset({"inference/llama-0"})
    problems = [r.problem for r in caplog.records if r.levelno == logging.WARNING]
    assert problems == [
        "List failed: RESOURCE_EXHAUSTED: rejected by rate limit",
        "undecodable List response: field 1: unsupported wire type 3",
    ]


# -- the agent ------------------------------------------------------------------------------------


@pytest.fixture
def fake(fake_nvml: FakeNvml) -> FakeNvml:
    """Two H200-like GPUs (200-700 W, default 700 W), loading a model: no process on either."""
    fake_nvml.set_count(2)
    for index in (0, 1):
        fake_nvml.set_power_w(index, 120).set_temperature_c(index, 40)
    return fake_nvml


def agent_tick(state_path: Path, pod_resources: PodResourcesSource | None) -> RecordingPublisher:
    """One tick: policy llama holds an allocation for GPU 1 only; its new pod llama-0 was
    given GPU 0 (by UUID) and is still loading its model."""
    source, publisher = StaticSource(), RecordingPublisher()
    source.set(policy(caps_w={GPU1: 380}), pods={"uid-llama-0": pod("uid-llama-0")})
    agent = Agent(NvmlBackend(), source, AgentSettings(node=NODE), publisher=publisher,
                  state=StateFile(state_path, NODE), clock=ManualClock(1000.0), proc_root=Path("/nonexistent"),
                  pod_resources=pod_resources)
    try:
        agent.tick()
    finally:
        agent.close()
    return publisher


def test_a_gpu_given_to_a_pod_is_its_policys_before_the_pod_runs_a_process(
    fake: FakeNvml, kubelet: FakeKubelet, tmp_path: Path,
) -> None:
    kubelet.assignments = {"inference/llama-0": {"server": {"nvidia.com/gpu": [GPU0]}}}
    kubelet.start()
    publisher = agent_tick(tmp_path / "state.json", PodResourcesSource(kubelet.socket_path))
    assert [g.pod for g in publisher.telemetries[-1].gpus] == ["inference/llama-0", None]
    assert (fake.limit_w(0), fake.limit_w(1)) == (200, 380)  # no allocation yet: its minimum


def test_without_the_pod_resources_api_the_loading_gpu_stays_unowned(fake: FakeNvml, tmp_path: Path) -> None:
    publisher = agent_tick(tmp_path / "state.json", None)
    assert [g.pod for g in publisher.telemetries[-1].gpus] == [None, None]
    assert (fake.limit_w(0), fake.limit_w(1)) == (700, 380)


def test_a_device_plugin_naming_gpus_by_index_is_understood(fake: FakeNvml, kubelet: FakeKubelet, tmp_path: Path) -> None:
    kubelet.assignments = {"inference/llama-0": {"server": {"nvidia.com/gpu": ["0"]}}}
    kubelet.start()
    publisher = agent_tick(tmp_path / "state.json", PodResourcesSource(kubelet.socket_path))
    assert [g.pod for g in publisher.telemetries[-1].gpus] == ["inference/llama-0", None]


def test_the_agent_ticks_on_when_the_kubelet_is_gone(fake: FakeNvml, kubelet: FakeKubelet, tmp_path: Path) -> None:
    publisher = agent_tick(tmp_path / "state.json", PodResourcesSource(kubelet.socket_path))
    assert [g.pod for g in publisher.telemetries[-1].gpus] == [None, None]
    assert fake.limit_w(1) == 380


def test_an_answer_larger_than_the_http2_window_arrives_whole(kubelet: FakeKubelet) -> None:
    """A big node (hundreds of pods) answers with more than HTTP/2's initial 64 KiB window:
    the client must acknowledge data to receive the rest."""
    kubelet.assignments = {
        f"inference/replica-with-a-long-name-{i:04d}": {"server": {"nvidia.com/gpu": [f"GPU-{i:08d}-0000-4000-8000-000000000000"]}}
        for i in range(3000)
    }
    assert len(list_response(kubelet.assignments).SerializeToString()) > 4 * 65535
    kubelet.start()
    mapping = PodResourcesSource(kubelet.socket_path).pods_by_device()
    assert len(mapping) == 3000
    assert mapping["GPU-00002999-0000-4000-8000-000000000000"] == frozenset({"inference/replica-with-a-long-name-2999"})


def test_a_stale_socket_nobody_listens_on_maps_nothing(caplog: pytest.LogCaptureFixture) -> None:
    directory = Path(tempfile.mkdtemp(prefix="kubelet-"))
    path = directory / "kubelet.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))  # a socket file left by a kubelet that is gone
    try:
        assert PodResourcesSource(path).pods_by_device() == {}
    finally:
        shutil.rmtree(directory)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.problem == "List failed: [Errno 111] Connection refused"


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["silent", "not-http2"])
def test_a_kubelet_that_hangs_or_speaks_something_else_costs_at_most_the_timeout(
    reply: bytes, caplog: pytest.LogCaptureFixture,
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="kubelet-"))
    path = directory / "kubelet.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    accepted: list[socket.socket] = []

    def serve() -> None:
        connection, _ = listener.accept()
        accepted.append(connection)
        if reply:
            connection.recv(65536)  # the client's preface and request
            connection.sendall(reply)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        started = time.monotonic()
        assert PodResourcesSource(path, timeout_s=0.3).pods_by_device() == {}
        assert time.monotonic() - started < 1.0
    finally:
        server.join(2)
        for connection in accepted:
            connection.close()
        listener.close()
        shutil.rmtree(directory)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.problem.startswith("List failed: ")
    # h2 waits for the rest of what reads as an HTTP/2 frame, so both end at the deadline
    assert warning.problem in ("List failed: timed out",) or warning.problem.startswith("List failed: HTTP/2: ")
