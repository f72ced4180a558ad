"""A kubelet pod-resources endpoint: a real gRPC server on a unix socket, encoding with the
real protobuf runtime from the messages of k8s.io/kubelet ``pkg/apis/podresources/v1/api.proto``
(as of Kubernetes 1.28: CPU IDs, memory and NUMA topology included, so a decoder must skip
the fields it does not read)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_INT64 = descriptor_pb2.FieldDescriptorProto.TYPE_INT64
_UINT64 = descriptor_pb2.FieldDescriptorProto.TYPE_UINT64
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_ONE = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_MANY = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "ListPodResourcesRequest": [],
    "ListPodResourcesResponse": [("pod_resources", 1, _MESSAGE, _MANY, ".v1.PodResources")],
    "PodResources": [
        ("name", 1, _STRING, _ONE, ""),
        ("namespace", 2, _STRING, _ONE, ""),
        ("containers", 3, _MESSAGE, _MANY, ".v1.ContainerResources"),
    ],
    "ContainerResources": [
        ("name", 1, _STRING, _ONE, ""),
        ("devices", 2, _MESSAGE, _MANY, ".v1.ContainerDevices"),
        ("cpu_ids", 3, _INT64, _MANY, ""),
        ("memory", 4, _MESSAGE, _MANY, ".v1.ContainerMemory"),
    ],
    "ContainerMemory": [
        ("memory_type", 1, _STRING, _ONE, ""),
        ("size", 2, _UINT64, _ONE, ""),
        ("topology", 3, _MESSAGE, _ONE, ".v1.TopologyInfo"),
    ],
    "ContainerDevices": [
        ("resource_name", 1, _STRING, _ONE, ""),
        ("device_ids", 2, _STRING, _MANY, ""),
        ("topology", 3, _MESSAGE, _ONE, ".v1.TopologyInfo"),
    ],
    "TopologyInfo": [("nodes", 1, _MESSAGE, _MANY, ".v1.NUMANode")],
    "NUMANode": [("ID", 1, _INT64, _ONE, "")],
}


def _message_classes() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="kubelet_podresources_v1.proto", package="v1", syntax="proto3")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    classes = message_factory.GetMessageClassesForFiles([file.name], pool)
    return {name.removeprefix("v1."): cls for name, cls in classes.items()}


MESSAGES = _message_classes()

# pod "namespace/name" -> container -> resource name -> device IDs
Assignments = Mapping[str, Mapping[str, Mapping[str, Sequence[str]]]]


def list_response(assignments: Assignments) -> Any:
    """A ListPodResourcesResponse as the kubelet builds it, with CPUs, memory and topology."""
    response = MESSAGES["ListPodResourcesResponse"]()
    for key, containers in assignments.items():
        namespace, _, name = key.partition("/")
        pod = response.pod_resources.add(name=name, namespace=namespace)
        for container_name, resources in containers.items():
            container = pod.containers.add(name=container_name)
            container.cpu_ids.extend([2, 3])
            memory = container.memory.add(memory_type="memory", size=64 << 30)
            memory.topology.nodes.add(ID=0)
            for resource, device_ids in resources.items():
                devices = container.devices.add(resource_name=resource)
                devices.device_ids.extend(device_ids)
                devices.topology.nodes.add(ID=1)
    return response


class FakeKubelet:
    """Serves ``v1.PodResourcesLister/List`` on ``socket_path`` (default: in a new temporary
    directory; a short path: unix socket paths are limited to 107 bytes). ``answer`` replaces the encoded response (bytes) or
    raises (a grpc status) for the failure tests."""

    def __init__(self, socket_path: Path | None = None) -> None:
        self._directory: Path | None = None
        if socket_path is None:
            self._directory = Path(tempfile.mkdtemp(prefix="kubelet-"))
            socket_path = self._directory / "kubelet.sock"
        self.socket_path = socket_path
        self.assignments: Assignments = {}
        self.answer: Callable[[grpc.ServicerContext], bytes] | None = None
        self.calls = 0
        self._server: grpc.Server | None = None

    def start(self, *, serve_list: bool = True) -> FakeKubelet:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        if serve_list:
            handler = grpc.unary_unary_rpc_method_handler(
                self._list,
                request_deserializer=MESSAGES["ListPodResourcesRequest"].FromString,
                response_serializer=lambda response: response,  # _list returns bytes already
            )
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("v1.PodResourcesLister", {"List": handler}),))
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server
        return self

    def _list(self, request: Any, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        if self.answer is not None:
            return self.answer(context)
        return list_response(self.assignments).SerializeToString()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def remove(self) -> None:
        self.stop()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
