"""GPU -> pod from the kubelet's pod-resources API (``v1.PodResourcesLister/List``).

The kubelet serves, on a unix socket (``/var/lib/kubelet/pod-resources/kubelet.sock``),
which devices of which extended resource it gave to each container. The NVIDIA device
plugin names a GPU by its UUID (``GPU-...``, the default ``DEVICE_ID_STRATEGY=uuid``) or by
its index (``index``); both are matched. Unlike the process path (``nodeagent.podmap``) it
knows a pod's GPUs before the pod runs a process on them: while a model loads, the GPU is
already the pod's, counted against its policy and reported in the node's telemetry.

The response is decoded here from the protobuf wire format (k8s.io/kubelet
``pkg/apis/podresources/v1/api.proto``: ``ListPodResourcesResponse.pod_resources = 1``;
``PodResources`` name 1, namespace 2, containers 3; ``ContainerResources`` name 1,
devices 2; ``ContainerDevices`` resource_name 1, device_ids 2). Fields this module does not
read (CPU IDs, memory, topology, dynamic resources) are skipped, so newer kubelets decode
too. The call itself is one gRPC unary request over HTTP/2 (:func:`grpc_unary_call`, on the
pure-Python ``h2`` state machine): the agent runs on every GPU node, and grpcio would add
about 17 MB to its ~62 MB. The tests call it against grpcio's own server.

A missing socket (no kubelet here, or the directory not mounted), a failed call or an
undecodable answer maps no GPU, with one log line when it starts and one when it ends:
the process path keeps working alone.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from powercap.numeric import counted
from powercap.objects import GPU_RESOURCE

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
DEFAULT_GPU_RESOURCES = (GPU_RESOURCE,)
LIST_METHOD = "/v1.PodResourcesLister/List"

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class PodResourcesError(Exception):
    """The kubelet's answer is not a ListPodResourcesResponse."""


@dataclass(frozen=True, slots=True)
class DeviceAssignment:
    """Devices of one resource that the kubelet gave to one container."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: tuple[str, ...]


# -- protobuf wire format --------------------------------------------------------------------


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise PodResourcesError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 64:
            raise PodResourcesError("varint longer than 10 bytes")


def _fields(data: memoryview) -> Iterator[tuple[int, Any]]:
    """(field number, value) of every field of one message; a length-delimited value is a
    memoryview, a varint an int; fixed-width values are skipped as None."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        value: Any = None
        if wire_type == _VARINT:
            value, position = _varint(data, position)
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise PodResourcesError(f"field {number}: {counted(length, 'byte')} announced, {len(data) - position} left")
            value = data[position:position + length]
            position += length
        elif wire_type in (_FIXED64, _FIXED32):
            position += 8 if wire_type == _FIXED64 else 4
            if position > len(data):
                raise PodResourcesError(f"field {number}: truncated fixed-width value")
        else:
            raise PodResourcesError(f"field {number}: unsupported wire type {wire_type}")
        if number == 0:
            raise PodResourcesError("field number 0")
        yield number, value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, memoryview):
        raise PodResourcesError(f"{what} is not a string")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as error:
        raise PodResourcesError(f"{what} is not UTF-8: {error}") from None


def _messages(data: memoryview, number: int, what: str) -> Iterator[memoryview]:
    for field_number, value in _fields(data):
        if field_number == number:
            if not isinstance(value, memoryview):
                raise PodResourcesError(f"{what} is not a message")
            yield value


def _strings(data: memoryview, wanted: Mapping[int, str]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {number: [] for number in wanted}
    for number, value in _fields(data):
        if number in wanted:
            found[number].append(_text(value, wanted[number]))
    return found


def decode_list_response(data: bytes) -> list[DeviceAssignment]:
    """Every (container, resource) with devices in a serialized ListPodResourcesResponse."""
    assignments: list[DeviceAssignment] = []
    for pod in _messages(memoryview(data), 1, "pod_resources"):
        names = _strings(pod, {1: "PodResources.name", 2: "PodResources.namespace"})
        pod_name, namespace = (names[1] or [""])[-1], (names[2] or [""])[-1]
        for container in _messages(pod, 3, "PodResources.containers"):
            container_name = (_strings(container, {1: "ContainerResources.name"})[1] or [""])[-1]
            for devices in _messages(container, 2, "ContainerResources.devices"):
                values = _strings(devices, {1: "ContainerDevices.resource_name", 2: "ContainerDevices.device_ids"})
                assignments.append(DeviceAssignment(
                    namespace=namespace,
                    pod=pod_name,
                    container=container_name,
                    resource=(values[1] or [""])[-1],
                    device_ids=tuple(values[2]),
                ))
    return assignments


def pods_by_device(assignments: Collection[DeviceAssignment], resources: Collection[str]) -> dict[str, frozenset[str]]:
    """Device ID -> the ``namespace/name`` of the pods holding it, for the given resource
    names only (another device plugin's IDs, such as a NIC's "0", must not name a GPU)."""
    result: dict[str, set[str]] = {}
    for assignment in assignments:
        if assignment.resource in resources:
            for device_id in assignment.device_ids:
                result.setdefault(device_id, set()).add(f"{assignment.namespace}/{assignment.pod}")
    return {device_id: frozenset(pods) for device_id, pods in result.items()}


# -- one gRPC unary call over HTTP/2 --------------------------------------------------------------

GRPC_STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)


class GrpcCallError(Exception):
    """The call did not return a message: a gRPC status other than OK, or a broken exchange."""


def _status_name(code: int) -> str:
    return GRPC_STATUS_NAMES[code] if 0 <= code < len(GRPC_STATUS_NAMES) else f"status {code}"


def grpc_unary_call(socket_path: Path, method: str, request: bytes, timeout_s: float) -> bytes:
    """Send one request message to ``method`` (``/package.Service/Method``) over a new
    HTTP/2 connection on a unix socket (prior knowledge, as gRPC does) and return the one
    response message, or raise :class:`GrpcCallError` or :class:`OSError` (connection
    refused, timeout)."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout_s)
        connection.connect(str(socket_path))
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        h2c.initiate_connection()
        stream = h2c.get_next_available_stream_id()
        h2c.send_headers(stream, [
            (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers"),
            ("grpc-timeout", f"{max(1, int(timeout_s * 1000))}m"),
        ])
        h2c.send_data(stream, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
        connection.sendall(h2c.data_to_send())
        headers: dict[str, str] = {}
        body = bytearray()
        ended = False
        try:
            while not ended:
                connection.settimeout(max(0.001, deadline - time.monotonic()))
                data = connection.recv(65536)
                if not data:
                    raise GrpcCallError("the server closed the connection before answering")
                for event in h2c.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        headers.update((str(k), str(v)) for k, v in event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                        ended = True
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                        raise GrpcCallError(f"stream reset by the server (HTTP/2 error {event.error_code})")
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        raise GrpcCallError(f"connection closed by the server (HTTP/2 error {event.error_code})")
                connection.sendall(h2c.data_to_send())
        except h2.exceptions.H2Error as error:
            raise GrpcCallError(f"HTTP/2: {error}") from None
    if headers.get(":status") != "200":
        raise GrpcCallError(f"HTTP status {headers.get(':status')}")
    status = headers.get("grpc-status")
    if status is None or not status.isdigit():
        raise GrpcCallError(f"no grpc-status in the answer (content-type {headers.get('content-type')})")
    if int(status) != 0:
        message = unquote(headers.get("grpc-message", ""))
        raise GrpcCallError(f"{_status_name(int(status))}: {message}" if message else _status_name(int(status)))
    if len(body) < 5 or body[0] != 0:
        raise GrpcCallError("the answer is not one uncompressed gRPC message")
    length = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise GrpcCallError(f"the answer holds {counted(len(body) - 5, 'byte')}, its prefix says {length}")
    return bytes(body[5:])


# -- the client ----------------------------------------------------------------------------------


class PodResourcesSource:
    """Asks the kubelet which pods hold which GPUs, once per call to :meth:`pods_by_device`."""

    def __init__(
        self,
        socket_path: Path,
        resources: Collection[str] = DEFAULT_GPU_RESOURCES,
        *,
        timeout_s: float = 0.5,
    ) -> None:
        self.socket_path = socket_path
        self.resources = frozenset(resources)
        self.timeout_s = timeout_s
        self._problem: str | None = None  # the last failure, logged once until it clears

    def pods_by_device(self) -> dict[str, frozenset[str]]:
        if not self.socket_path.exists():
            self._failed(f"socket {self.socket_path} not found", logging.INFO)
            return {}
        try:
            data = grpc_unary_call(self.socket_path, LIST_METHOD, b"", self.timeout_s)  # ListPodResourcesRequest{}
            result = pods_by_device(decode_list_response(data), self.resources)
        except (OSError, GrpcCallError) as error:
            self._failed(f"List failed: {error}", logging.WARNING)
            return {}
        except PodResourcesError as error:
            self._failed(f"undecodable List response: {error}", logging.WARNING)
            return {}
        if self._problem is not None:
            log.info("kubelet pod-resources API answers again", extra={"socket": str(self.socket_path)})
            self._problem = None
        return result

    def _failed(self, problem: str, level: int) -> None:
        if self._problem != problem:
            log.log(level, "kubelet pod-resources API unavailable; mapping GPUs to pods by their processes only",
                    extra={"socket": str(self.socket_path), "problem": problem})
            self._problem = problem
