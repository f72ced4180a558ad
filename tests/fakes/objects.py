"""Realistic Kubernetes objects for tests and benchmarks: GPU Nodes, Pods, policies.

``gpu_node`` builds a Node as the API serves one for an 8-GPU H100 server with the NVIDIA
GPU operator installed: feature-discovery labels, kubelet annotations, capacity and
allocatable, the five node conditions, addresses, nodeInfo and the 50 images the kubelet
reports (its default ``nodeStatusMaxImages``), about 14 KB of JSON, like the real thing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from powercap.nodepower import NodePower
from powercap.telemetry import GpuTelemetry, NodeTelemetry, format_timestamp, to_json

NOW = datetime(2026, 11, 27, 23, 20, 0, tzinfo=timezone.utc)
RACK_LABEL = "powercapping.example.com/rack"
TELEMETRY = "powercapping.example.com/telemetry"
POWER_WATTS = "powercapping.example.com/power-watts"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def telemetry(
    power_w: float,
    *,
    at: datetime = NOW,
    inlet_c: float | None = 24.0,
    gpus: int = 8,
    pods: Sequence[str | None] = (),
    min_w: float = 200,
    max_w: float = 700,
    node_power: NodePower | None = None,
) -> str:
    """A telemetry annotation value: ``power_w`` spread over ``gpus`` GPUs, ``pods[i]`` on GPU i;
    ``node_power``: the whole node's reading (None: an agent that sends none)."""
    per_gpu = power_w / gpus if gpus else 0.0
    return to_json(NodeTelemetry(
        timestamp=at,
        power_w=power_w,
        inlet_temperature_c=inlet_c,
        node_power=node_power,
        gpus=tuple(
            GpuTelemetry(
                uuid=f"GPU-{hashlib.md5(f'{at}{i}'.encode()).hexdigest()[:8]}-0000-0000-0000-{i:012d}",
                index=i, power_w=per_gpu, limit_w=max_w, min_w=min_w, max_w=max_w,
                temperature_c=45.0, pod=pods[i] if i < len(pods) else None,
            )
            for i in range(gpus)
        ),
    ))


def _images(name: str) -> list[dict[str, Any]]:
    repositories = [
        "nvcr.io/nvidia/tritonserver", "vllm/vllm-openai", "nvcr.io/nvidia/k8s/dcgm-exporter",
        "nvcr.io/nvidia/gpu-operator", "nvcr.io/nvidia/k8s-device-plugin", "nvcr.io/nvidia/cuda",
        "registry.k8s.io/kube-proxy", "docker.io/calico/node", "docker.io/calico/cni",
        "registry.k8s.io/pause", "quay.io/prometheus/node-exporter", "nvcr.io/nvidia/driver",
    ]
    images = []
    for i in range(50):
        repository = repositories[i % len(repositories)]
        digest = hashlib.sha256(f"{name}-{i}".encode()).hexdigest()
        tag = f"v{2 + i % 5}.{i % 13}.{i % 7}"
        images.append({
            "names": [f"{repository}@sha256:{digest}", f"{repository}:{tag}"],
            "sizeBytes": 50_000_000 + 97_531_357 * i,
        })
    return images


def gpu_node(
    name: str,
    rack: str | None = None,
    annotation: str | None = None,
    *,
    gpus: int = 8,
    rack_label: str = RACK_LABEL,
) -> dict[str, Any]:
    """A full Node object of an 8-GPU (``gpus``) H100 server in ``rack``, with the telemetry
    annotation value ``annotation`` (None: no annotation)."""
    index = int(hashlib.md5(name.encode()).hexdigest()[:6], 16)
    ip = f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"
    labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "p5.48xlarge",
        "topology.kubernetes.io/region": "us-east-1",
        "topology.kubernetes.io/zone": "us-east-1a",
        "feature.node.kubernetes.io/cpu-cpuid.AVX512F": "true",
        "feature.node.kubernetes.io/cpu-model.family": "25",
        "feature.node.kubernetes.io/kernel-version.full": "6.8.0-1015-aws",
        "feature.node.kubernetes.io/pci-10de.present": "true",
        "feature.node.kubernetes.io/system-os_release.ID": "ubuntu",
        "feature.node.kubernetes.io/system-os_release.VERSION_ID": "22.04",
        "nvidia.com/cuda.driver.major": "550",
        "nvidia.com/cuda.driver.minor": "90",
        "nvidia.com/cuda.driver.rev": "07",
        "nvidia.com/cuda.runtime.major": "12",
        "nvidia.com/cuda.runtime.minor": "4",
        "nvidia.com/gfd.timestamp": "1732740000",
        "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0",
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.deploy.container-toolkit": "true",
        "nvidia.com/gpu.deploy.dcgm": "true",
        "nvidia.com/gpu.deploy.dcgm-exporter": "true",
        "nvidia.com/gpu.deploy.device-plugin": "true",
        "nvidia.com/gpu.deploy.driver": "pre-installed",
        "nvidia.com/gpu.deploy.gpu-feature-discovery": "true",
        "nvidia.com/gpu.deploy.node-status-exporter": "true",
        "nvidia.com/gpu.deploy.operator-validator": "true",
        "nvidia.com/gpu.family": "hopper",
        "nvidia.com/gpu.machine": "p5.48xlarge",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/mig.capable": "true",
        "nvidia.com/mig.strategy": "single",
    }
    if rack is not None:
        labels[rack_label] = rack
    annotations = {
        "csi.volume.kubernetes.io/nodeid": json.dumps({"ebs.csi.aws.com": f"i-0{index:016x}"}),
        "node.alpha.kubernetes.io/ttl": "0",
        "nfd.node.kubernetes.io/feature-labels": "cpu-cpuid.AVX512F,cpu-model.family,kernel-version.full,pci-10de.present",
        "nfd.node.kubernetes.io/master.version": "v0.16.3",
        "projectcalico.org/IPv4Address": f"{ip}/20",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
    }
    if annotation is not None:
        annotations[TELEMETRY] = annotation
    resources = {
        "cpu": "192", "ephemeral-storage": "7497449632Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0",
        "memory": "2097152000Ki", "nvidia.com/gpu": str(gpus), "pods": "110", "vpc.amazonaws.com/efa": "32",
    }
    allocatable = {**resources, "cpu": "191450m", "ephemeral-storage": "6909395669731", "memory": "2085523456Ki"}
    heartbeat = rfc3339(NOW - timedelta(seconds=17))
    since = "2026-11-20T08:14:31Z"

    def condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {"type": kind, "status": status, "lastHeartbeatTime": heartbeat, "lastTransitionTime": since,
                "reason": reason, "message": message}

    return {
        "metadata": {
            "name": name,
            "uid": hashlib.md5(f"uid-{name}".encode()).hexdigest(),
            "resourceVersion": str(100000 + index % 100000),
            "creationTimestamp": since,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {"providerID": f"aws:///us-east-1a/i-0{index:016x}", "podCIDR": "100.64.12.0/24", "podCIDRs": ["100.64.12.0/24"]},
        "status": {
            "capacity": resources,
            "allocatable": allocatable,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "InternalDNS", "address": f"ip-{ip.replace('.', '-')}.ec2.internal"},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": hashlib.md5(f"machine-{name}".encode()).hexdigest(),
                "systemUUID": f"ec2{index:05x}-2f4e-4c2a-9b1e-{index:012x}"[:36],
                "bootID": hashlib.md5(f"boot-{name}".encode()).hexdigest(),
                "kernelVersion": "6.8.0-1015-aws",
                "osImage": "Ubuntu 22.04.5 LTS",
                "containerRuntimeVersion": "containerd://1.7.22",
                "kubeletVersion": "v1.31.2",
                "kubeProxyVersion": "v1.31.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": _images(name),
        },
    }


def gpu_pod(
    name: str,
    namespace: str = "inference",
    *,
    gpus: int = 1,
    labels: dict[str, str] | None = None,
    node: str | None = None,
    bound_at: datetime | None = None,
    power_watts: str | None = None,
    phase: str | None = None,
) -> dict[str, Any]:
    """A Pod of a vLLM server asking for ``gpus`` GPUs; bound to ``node`` at ``bound_at`` when given."""
    resources: dict[str, Any] = {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
    created = rfc3339((bound_at or NOW) - timedelta(seconds=2))
    pod: dict[str, Any] = {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": hashlib.md5(f"{namespace}/{name}".encode()).hexdigest(),
            "resourceVersion": "4242",
            "creationTimestamp": created,
            "labels": dict(labels if labels is not None else {"app.kubernetes.io/name": "llama"}),
            "annotations": {POWER_WATTS: power_watts} if power_watts is not None else {},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-rs",
                                 "uid": "0f6c7d0a-1111-2222-3333-444455556666", "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "containers": [{
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.6.4",
                "args": ["--model", "meta-llama/Llama-3.1-70B-Instruct", "--tensor-parallel-size", str(max(gpus, 1))],
                "ports": [{"containerPort": 8000, "name": "http", "protocol": "TCP"}],
                "resources": resources,
            }],
            "restartPolicy": "Always",
            "schedulerName": "power-aware-scheduler",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "status": {"phase": phase or ("Running" if node else "Pending"), "qosClass": "Burstable"},
    }
    if node is not None:
        pod["spec"]["nodeName"] = node
        pod["status"]["conditions"] = [
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": rfc3339(bound_at or NOW)},
        ]
    return pod


def policy(
    name: str,
    namespace: str = "inference",
    *,
    cap_w: int = 4200,
    racks: Sequence[dict[str, Any]] = (),
    algorithm: dict[str, Any] | None = None,
    selector: dict[str, Any] | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """A PowerCappingPolicy document; ``racks`` are rackConstraints entries."""
    spec: dict[str, Any] = {
        "powerCapLimit": cap_w,
        "selector": selector if selector is not None else {"matchLabels": {"app.kubernetes.io/name": "llama"}},
    }
    if racks:
        spec["rackConstraints"] = [dict(r) for r in racks]
    if algorithm is not None:
        spec["customAlgorithm"] = algorithm
    if mode is not None:
        spec["mode"] = mode
    return {
        "apiVersion": "powercapping.example.com/v1alpha1",
        "kind": "PowerCappingPolicy",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}", "generation": 1,
                     "resourceVersion": "777"},
        "spec": spec,
    }


def fmt(moment: datetime) -> str:
    return format_timestamp(moment)


def kubectl_list(nodes: Sequence[dict[str, Any]] = (), pods: Sequence[dict[str, Any]] = (),
                 policies: Sequence[dict[str, Any]] = (), others: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """What ``kubectl get nodes,pcn,pods,pcp -A -o yaml`` prints: a ``kind: List`` whose items carry
    their kind and apiVersion."""
    items = [{"apiVersion": "v1", "kind": "Node", **n} for n in nodes]
    items += [{"apiVersion": "v1", "kind": "Pod", **p} for p in pods]
    items += list(policies) + list(others)
    return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}


def extender_args(pod: dict[str, Any], nodes: Sequence[dict[str, Any]], *, node_cache_capable: bool) -> bytes:
    """The body kube-scheduler POSTs: Go's encoding/json of ExtenderArgs (field order Pod, Nodes,
    NodeNames; nil pointers as null; compact)."""
    if node_cache_capable:
        document = {"Pod": pod, "Nodes": None, "NodeNames": [n["metadata"]["name"] for n in nodes]}
    else:
        document = {"Pod": pod, "Nodes": {"metadata": {}, "items": list(nodes) or None}, "NodeNames": None}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
