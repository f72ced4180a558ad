"""PowerCapNode, the per-node telemetry object: what the agent writes, and how readers merge
it with the Nodes (the object wins; an old annotation is still read for one release)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from powercap.cluster import ClusterSettings, TelemetryStatus, build_cluster_view
from powercap.nodeobjects import NODE_KIND, NodeObjectIndex, merge_node_objects, node_object, status_patch
from powercap.runtime.sources import TelemetryNodes, load_state
from powercap.telemetry import TELEMETRY_ANNOTATION, from_document, from_json, to_document
from tests.fakes.objects import NOW, gpu_node, telemetry


def powercapnode(name: str, annotation: str | None) -> dict[str, Any]:
    """A PowerCapNode as the API server returns it, its status the document ``annotation`` holds."""
    obj: dict[str, Any] = {"apiVersion": "powercapping.example.com/v1alpha1", "kind": NODE_KIND,
                           "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "7"}}
    if annotation is not None:
        obj["status"] = json.loads(annotation)
    return obj


def read(node: dict[str, Any]) -> float:
    """The powerW a reader sees on a merged node."""
    return from_json(node["metadata"]["annotations"][TELEMETRY_ANNOTATION]).power_w


def test_the_status_patch_carries_the_whole_document_and_reads_back_the_same() -> None:
    sample = from_json(telemetry(2400.0, pods=["inference/llama-0"]))
    patch = status_patch(sample)
    assert set(patch) == {"status"}
    assert to_document(from_document(patch["status"])) == to_document(sample)


def test_the_object_is_named_after_its_node_and_owned_by_it() -> None:
    assert node_object("gpu-1", "uid-1") == {
        "apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCapNode",
        "metadata": {"name": "gpu-1", "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "gpu-1", "uid": "uid-1"}]},
    }
    assert "ownerReferences" not in node_object("gpu-1")["metadata"]


@pytest.mark.parametrize(
    ("annotation_w", "object_w", "seen_w"),
    [
        pytest.param(1000.0, 2000.0, 2000.0, id="object-wins-over-annotation"),
        pytest.param(1000.0, None, 1000.0, id="annotation-only-still-read"),
        pytest.param(None, 2000.0, 2000.0, id="object-only"),
    ],
)
def test_a_nodes_telemetry_comes_from_its_object_else_from_the_old_annotation(
    annotation_w: float | None, object_w: float | None, seen_w: float,
) -> None:
    node = gpu_node("gpu-1", "rack-1", telemetry(annotation_w) if annotation_w is not None else None)
    objects = [powercapnode("gpu-1", telemetry(object_w))] if object_w is not None else []
    [merged] = merge_node_objects([node], objects)
    assert read(merged) == seen_w
    view = build_cluster_view([merged], [], [], NOW, ClusterSettings())
    assert view.nodes["gpu-1"].telemetry_status is TelemetryStatus.FRESH
    assert view.nodes["gpu-1"].measured_power_w == seen_w


def test_an_object_created_but_never_published_leaves_the_annotation_and_says_missing_without_one() -> None:
    """The agent creates the object, then patches its status: in between it has none."""
    with_annotation = gpu_node("gpu-1", "rack-1", telemetry(1000.0))
    without = gpu_node("gpu-2", "rack-1")
    merged = merge_node_objects([with_annotation, without], [powercapnode("gpu-1", None), powercapnode("gpu-2", None)])
    assert merged[0] is with_annotation and merged[1] is without
    view = build_cluster_view(merged, [], [], NOW, ClusterSettings())
    assert view.nodes["gpu-2"].telemetry_status is TelemetryStatus.MISSING
    assert view.nodes["gpu-2"].telemetry_problem == (
        "no telemetry from node gpu-2 (no PowerCapNode gpu-2 with a status; is the node agent running there?)")


def test_a_stale_object_stays_stale_even_when_the_annotation_is_fresher() -> None:
    """The object wins whatever its age: an upgraded agent that stopped publishing must not
    be covered by what an older one left on the Node (hold or lower, never restore)."""
    node = gpu_node("gpu-1", "rack-1", telemetry(1000.0, at=NOW))
    [merged] = merge_node_objects([node], [powercapnode("gpu-1", telemetry(2000.0, at=NOW - timedelta(minutes=10)))])
    view = build_cluster_view([merged], [], [], NOW, ClusterSettings())
    assert view.nodes["gpu-1"].telemetry_status is TelemetryStatus.STALE
    assert view.nodes["gpu-1"].measured_power_w == 0.0


def test_a_malformed_object_is_reported_for_its_node_not_raised() -> None:
    broken = powercapnode("gpu-1", telemetry(1000.0))
    broken["status"]["powerW"] = "lots"
    [merged] = merge_node_objects([gpu_node("gpu-1", "rack-1")], [broken])
    view = build_cluster_view([merged], [], [], NOW, ClusterSettings())
    assert view.nodes["gpu-1"].telemetry_status is TelemetryStatus.MALFORMED
    assert "powerW must be a finite number" in (view.nodes["gpu-1"].telemetry_problem or "")


def test_an_object_without_a_node_is_ignored_and_the_watched_node_is_never_changed() -> None:
    node = gpu_node("gpu-1", "rack-1", telemetry(1000.0))
    before = json.dumps(node, sort_keys=True)
    merged = merge_node_objects([node], [powercapnode("gpu-1", telemetry(2000.0)), powercapnode("gone", telemetry(9.0))])
    assert [m["metadata"]["name"] for m in merged] == ["gpu-1"]
    assert json.dumps(node, sort_keys=True) == before


def test_watch_events_change_only_their_nodes_entry_so_the_view_rereads_only_what_changed() -> None:
    index = NodeObjectIndex()
    for i in range(3):
        index.node_event("ADDED", gpu_node(f"gpu-{i}", "rack-1", telemetry(500.0)))
        index.object_event("ADDED", powercapnode(f"gpu-{i}", telemetry(1000.0 + i)))
    first = index.items()
    assert [read(node) for node in first] == [1000.0, 1001.0, 1002.0]
    index.object_event("MODIFIED", powercapnode("gpu-1", telemetry(5000.0)))
    second = index.items()
    assert second[0] is first[0] and second[2] is first[2]
    assert read(second[1]) == 5000.0
    index.object_event("DELETED", powercapnode("gpu-1", telemetry(5000.0)))
    assert read(index.items()[1]) == 500.0  # back to the annotation an older agent left
    index.node_event("DELETED", gpu_node("gpu-2", "rack-1"))
    assert [n["metadata"]["name"] for n in index.items()] == ["gpu-0", "gpu-1"]
    index.object_event("ADDED", powercapnode("gpu-9", telemetry(9.0)))  # its Node comes later
    index.node_event("ADDED", gpu_node("gpu-9", "rack-1"))
    assert read(index.items()[-1]) == 9.0


def test_a_state_file_with_powercapnodes_reads_their_telemetry() -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", **gpu_node("gpu-1", "rack-1", telemetry(1000.0))},
        powercapnode("gpu-1", telemetry(3000.0)),
        {"apiVersion": "v1", "kind": "Node", **gpu_node("gpu-2", "rack-1", telemetry(1500.0))},
    ]}
    nodes, _, _ = load_state(json.dumps(listing))
    assert [read(node) for node in nodes] == [3000.0, 1500.0]


class ListCache:
    """A watch cache's surface, synced or not as the test sets it."""

    def __init__(self, name: str, synced: bool = True) -> None:
        self.name, self.synced = name, synced

    @property
    def has_synced(self) -> bool:
        return self.synced

    @property
    def version(self) -> int:
        return 0

    def items(self) -> list[Any]:
        return []

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""


def test_the_node_cache_waits_for_both_lists_and_moves_with_either_caches_events() -> None:
    cache = TelemetryNodes()
    objects = ListCache("powercapnodes", synced=False)
    cache.attach(ListCache("nodes"), objects)
    assert not cache.has_synced and cache.waiting_for() == ["powercapnodes"]
    objects.synced = True
    cache.node_event("ADDED", gpu_node("gpu-1", "rack-1", telemetry(1000.0)))
    first = cache.items()
    assert read(first[0]) == 1000.0 and cache.items() is first  # nothing moved: the same list
    version = cache.version
    cache.object_event("ADDED", powercapnode("gpu-1", telemetry(2000.0)))
    assert cache.version > version and read(cache.items()[0]) == 2000.0


def test_the_simulated_agents_publish_powercapnodes_that_the_view_reads() -> None:
    """The simulator's nodes: no telemetry before the first publish, then a PowerCapNode
    whose status is the document, and the Node the view reads carries exactly it."""
    from powercap.algorithms import AlgorithmRegistry
    from powercap.policies import parse_policy
    from powercap.simulation.scenario import default_scenario_text, load_scenario
    from powercap.simulation.world import World

    scenario = load_scenario(default_scenario_text())
    registry = AlgorithmRegistry.default(discover=lambda: [])
    policies = {p.key: p for p in (parse_policy(doc, registry) for doc in scenario.policies)}
    node = World.build(scenario, policies).nodes[0]
    assert node.telemetry_object() is None
    assert TELEMETRY_ANNOTATION not in (node.api_object()["metadata"].get("annotations") or {})
    sample = from_json(telemetry(2400.0, gpus=len(node.gpus)))
    node.set_telemetry(sample)
    published = node.telemetry_object()
    assert published is not None and published["kind"] == NODE_KIND and published["metadata"]["name"] == node.name
    assert published["status"] == to_document(sample)
    assert read(node.api_object()) == 2400.0


def test_every_field_of_the_crd_has_a_description_for_kubectl_explain() -> None:
    """And the schema holds what the agent writes: every key of the document is a property."""
    import yaml

    from tests.conftest import REPO_ROOT

    crd = yaml.safe_load((REPO_ROOT / "config" / "crd" / "powercapping.example.com_powercapnodes.yaml").read_text())
    [version] = crd["spec"]["versions"]
    undescribed: list[str] = []

    def walk(schema: dict[str, Any], path: str) -> None:
        if path != "metadata" and not schema.get("description"):
            undescribed.append(path or "<root>")
        for name, child in (schema.get("properties") or {}).items():
            walk(child, f"{path}.{name}" if path else name)
        if "items" in schema:
            walk(schema["items"], f"{path}[]")

    walk(version["schema"]["openAPIV3Schema"], "")
    assert undescribed == []
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    sample = json.loads(telemetry(2400.0, pods=["inference/llama-0"]))
    sample["nodePower"] = {"watts": 4000, "source": "redfish", "ageS": 1.5}
    assert set(sample) <= set(status["properties"])
    assert set(sample["gpus"][0]) <= set(status["properties"]["gpus"]["items"]["properties"])
    assert set(sample["nodePower"]) <= set(status["properties"]["nodePower"]["properties"])


def test_without_the_powercapnode_list_the_view_waits_rather_than_read_annotations_alone() -> None:
    """CRD not installed yet, or the list refused: the extender answers not ready (pods wait
    and are retried) and the controller runs no round, as when they are down."""
    from powercap.algorithms import AlgorithmRegistry
    from powercap.runtime.sources import CacheSource, NotReady

    nodes = TelemetryNodes()
    nodes.attach(ListCache("nodes"), ListCache("powercapnodes", synced=False))
    nodes.node_event("ADDED", gpu_node("gpu-1", "rack-1", telemetry(1000.0)))
    source = CacheSource(nodes, ListCache("pods"), ListCache("powercappingpolicies"), ClusterSettings(),
                         AlgorithmRegistry.default(discover=lambda: []), clock=lambda: NOW)
    assert source.readiness() == "waiting for the first list of powercapnodes"
    with pytest.raises(NotReady, match="powercapnodes"):
        source.current()


def queue_object(name: str, waiting: dict[str, Any]) -> dict[str, Any]:
    """A PowerCapNode whose GPUs (by UUID) report these ``requestsWaiting`` (None: absent)."""
    gpus = []
    for index, (uuid, count) in enumerate(waiting.items()):
        gpu: dict[str, Any] = {"uuid": uuid, "index": index, "powerW": 400.0, "limitW": 500.0, "minW": 200.0,
                               "maxW": 700.0, "temperatureC": 60.0, "pod": "inference/llama-0"}
        if count is not None:
            gpu["requestsWaiting"] = count
        gpus.append(gpu)
    document = {"timestamp": "2026-11-27T23:19:01Z", "powerW": 400.0 * len(gpus), "inletTemperatureC": 24.0, "gpus": gpus}
    return powercapnode(name, json.dumps(document))


def test_the_node_cache_tells_when_a_queue_forms() -> None:
    """The controller's early round (controller.loop): a listener hears of a node's first
    queue (a GPU with requests waiting where the node's last telemetry showed none), once
    per forming, as the agent publishes it at once (agentplan.queue_formed)."""
    cache = TelemetryNodes()
    heard: list[str] = []
    cache.on_queue_formed(heard.append)
    events = [
        ("ADDED", queue_object("gpu-1", {"GPU-a": 0, "GPU-b": None})),  # no queue
        ("MODIFIED", queue_object("gpu-1", {"GPU-a": 3, "GPU-b": None})),  # forms: heard
        ("MODIFIED", queue_object("gpu-1", {"GPU-a": 9, "GPU-b": None})),  # longer: the same queue
        ("MODIFIED", queue_object("gpu-1", {"GPU-a": 9, "GPU-b": 1})),  # a second GPU's: the node had one
        ("MODIFIED", queue_object("gpu-2", {"GPU-c": 2})),  # another node's first: heard
        ("MODIFIED", queue_object("gpu-1", {"GPU-a": 0, "GPU-b": 0})),  # drained
        ("MODIFIED", queue_object("gpu-1", {"GPU-a": 1, "GPU-b": 0})),  # forms again: heard
        ("DELETED", queue_object("gpu-1", {"GPU-a": 1, "GPU-b": 0})),
        ("ADDED", queue_object("gpu-1", {"GPU-a": 1, "GPU-b": 0})),  # a new object with a queue: heard
        ("MODIFIED", queue_object("gpu-3", {"GPU-d": "3", "GPU-e": True, "GPU-f": -1, "GPU-g": 2.5})),  # malformed: none
        ("MODIFIED", powercapnode("gpu-4", None)),  # created, never published
    ]
    for event_type, obj in events:
        cache.object_event(event_type, obj)
    assert heard == ["gpu-1", "gpu-2", "gpu-1", "gpu-1"]
