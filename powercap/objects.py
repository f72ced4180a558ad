"""Facts read off raw Kubernetes objects (dicts as the API serves them), shared by every service.

Pure functions; nothing here talks to the API. The extender, the budget controller, the
node agent and the simulator all read Nodes, Pods and policies the same way through them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from powercap import API_GROUP
from powercap.policies import Policy
from powercap.schema import json_type_of

RACK_LABEL = f"{API_GROUP}/rack"
POWER_ANNOTATION = f"{API_GROUP}/power-watts"
METRICS_ANNOTATION = f"{API_GROUP}/metrics"
GPU_RESOURCE = "nvidia.com/gpu"

KubeObject = Mapping[str, Any]


def object_key(obj: KubeObject) -> str:
    """``namespace/name`` for namespaced objects, ``name`` for cluster-scoped ones."""
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata.get('name', '')}" if namespace else str(metadata.get("name", ""))


_OBJECT_FIELDS = ("metadata", "spec", "status")
_STRING_MAPS = (("metadata", "labels"), ("metadata", "annotations"))
_QUANTITY_MAPS = (("status", "capacity"), ("status", "allocatable"))


def shape_problems(obj: Any) -> list[str]:
    """What makes ``obj`` unreadable as a Kubernetes Node or Pod here, one message per field
    (empty when the fields this project reads have the types the API server gives them).

    The API server never serves such objects; a hand-written request or state file can,
    and the readers above would then fail on them instead of saying what is wrong.
    """
    if not isinstance(obj, Mapping):
        return [f"must be an object, not {json_type_of(obj)}"]
    problems = [
        f"{name}: must be an object, not {json_type_of(obj[name])}"
        for name in _OBJECT_FIELDS if obj.get(name) is not None and not isinstance(obj[name], Mapping)
    ]
    if problems:
        return problems
    metadata = obj.get("metadata") or {}
    problems += [f"metadata.{name}: must be a string, not {json_type_of(metadata[name])}"
                 for name in ("name", "namespace", "uid") if metadata.get(name) is not None and not isinstance(metadata[name], str)]
    for section, name in (*_STRING_MAPS, *_QUANTITY_MAPS):
        value = (obj.get(section) or {}).get(name)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            problems.append(f"{section}.{name}: must be an object, not {json_type_of(value)}")
        elif (section, name) in _STRING_MAPS:
            problems += [f"{section}.{name}[{key}]: must be a string, not {json_type_of(v)}"
                         for key, v in value.items() if not isinstance(v, str)]
    spec = obj.get("spec") or {}
    for field_name in ("containers", "initContainers"):
        containers = spec.get(field_name)
        if containers is None:
            continue
        if not isinstance(containers, list):
            problems.append(f"spec.{field_name}: must be a list, not {json_type_of(containers)}")
            continue
        for index, container in enumerate(containers):
            path = f"spec.{field_name}[{index}]"
            if not isinstance(container, Mapping):
                problems.append(f"{path}: must be an object, not {json_type_of(container)}")
                continue
            resources = container.get("resources")
            if resources is None:
                continue
            if not isinstance(resources, Mapping):
                problems.append(f"{path}.resources: must be an object, not {json_type_of(resources)}")
                continue
            problems += [f"{path}.resources.{section}: must be an object, not {json_type_of(resources[section])}"
                         for section in ("limits", "requests")
                         if resources.get(section) is not None and not isinstance(resources[section], Mapping)]
    return problems


def labels_of(obj: KubeObject) -> Mapping[str, str]:
    labels = (obj.get("metadata") or {}).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def annotations_of(obj: KubeObject) -> Mapping[str, str]:
    annotations = (obj.get("metadata") or {}).get("annotations")
    return annotations if isinstance(annotations, Mapping) else {}


def node_rack(node: KubeObject, rack_label: str = RACK_LABEL) -> str | None:
    """The rack a node is in (the value of its rack label), or None when unlabelled."""
    rack = labels_of(node).get(rack_label)
    return rack if isinstance(rack, str) and rack else None


def node_gpu_capacity(node: KubeObject) -> int:
    """Allocatable ``nvidia.com/gpu`` of a node (0 when it has none)."""
    status = node.get("status") or {}
    allocatable = status.get("allocatable") or status.get("capacity") or {}
    return parse_count(allocatable.get(GPU_RESOURCE))


def parse_count(quantity: Any) -> int:
    """A whole-number Kubernetes quantity such as ``"4"`` or ``4``; anything else counts as 0."""
    if isinstance(quantity, bool):
        return 0
    if isinstance(quantity, int):
        return max(quantity, 0)
    if isinstance(quantity, str) and quantity.strip().isdigit():
        return int(quantity.strip())
    return 0


def pod_gpus_requested(pod: KubeObject) -> int:
    """GPUs a pod asks for: the larger of its containers' sum and its largest init container.

    Extended resources are requested through ``limits`` (``requests``, when present, must
    equal them), so limits are read first.
    """
    spec = pod.get("spec") or {}
    containers = sum(_container_gpus(c) for c in spec.get("containers") or () if isinstance(c, Mapping))
    init = max((_container_gpus(c) for c in spec.get("initContainers") or () if isinstance(c, Mapping)), default=0)
    return max(containers, init)


def pod_gpu_container(pod: KubeObject) -> str | None:
    """The name of the one container of the pod that asks for GPUs; None when none or
    several do (which of them holds a given GPU is then not known from the spec)."""
    containers = (pod.get("spec") or {}).get("containers") or ()
    named = [c.get("name") for c in containers if isinstance(c, Mapping) and _container_gpus(c) > 0]
    return named[0] if len(named) == 1 and isinstance(named[0], str) else None


def _container_gpus(container: Mapping[str, Any]) -> int:
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        value = (resources.get(section) or {}).get(GPU_RESOURCE)
        if value is not None:
            return parse_count(value)
    return 0


def pod_power_annotation_w(pod: KubeObject) -> float | None:
    """The user's power estimate for a pod (annotation ``powercapping.example.com/power-watts``).

    None when absent or not a positive finite number of watts.
    """
    raw = annotations_of(pod).get(POWER_ANNOTATION)
    try:
        watts = float(str(raw).strip().removesuffix("W").strip()) if raw is not None else None
    except ValueError:
        return None
    return watts if watts is not None and math.isfinite(watts) and watts > 0 else None


def pod_power_annotation_problem(pod: KubeObject) -> str | None:
    """Why a pod's ``powercapping.example.com/power-watts`` annotation is ignored, or None
    when it is absent or usable (see :func:`pod_power_annotation_w`)."""
    raw = annotations_of(pod).get(POWER_ANNOTATION)
    if raw is None or pod_power_annotation_w(pod) is not None:
        return None
    return (f'annotation {POWER_ANNOTATION}: {json.dumps(str(raw))} is not a positive number of watts '
            '(such as "400" or "400W")')


def pod_is_active(pod: KubeObject) -> bool:
    """Whether a pod holds (or will hold) its node's resources: not Succeeded, Failed or deleted."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not (pod.get("metadata") or {}).get("deletionTimestamp")


def policy_for_pod(pod: KubeObject, policies: Iterable[Policy]) -> Policy | None:
    """The policy whose selector matches the pod, in the pod's namespace.

    The webhook refuses overlapping selectors in one namespace; should two match anyway
    (created before the webhook ran), the first by name wins, deterministically.
    """
    namespace = (pod.get("metadata") or {}).get("namespace") or "default"
    labels = labels_of(pod)
    matching = [p for p in policies if p.namespace == namespace and p.selector.matches(labels)]
    return min(matching, key=lambda p: p.name) if matching else None
