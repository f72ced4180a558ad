"""The agent in a cluster: policies and its own node's pods from watch caches, telemetry in
its node's PowerCapNode (never on the Node), Events on policies, and an API server that goes away. Real sockets: the fake
API server of tests/fakes/apiserver.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from nodeagent.agent import Agent, AgentSettings
from nodeagent.podresources import PodResourcesSource
from nodeagent.publisher import KubePublisher
from nodeagent.simulated import ManualClock, SimulatedBackend
from nodeagent.sources import ClusterSource
from powercap import physics
from powercap.agentplan import PublishSettings
from powercap import kube
from powercap.kube import KubeClient
from powercap.telemetry import TELEMETRY_ANNOTATION, from_document, to_document
from tests.agenthelpers import (
    NODE, StaticSource, allocation_document, node_object, pod, policy, policy_document, wait_until,
)
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.kubelet import FakeKubelet

UID = "6f1d2c3b-0000-4000-8000-00000000abcd"



@pytest.fixture
def client(apiserver: FakeApiServer) -> Iterator[KubeClient]:
    with KubeClient.for_server(apiserver.url, connect_timeout_s=0.5, read_timeout_s=2.0) as kube_client:
        yield kube_client


@pytest.fixture
def cluster(apiserver: FakeApiServer, client: KubeClient) -> Iterator[tuple[ClusterSource, ManualClock]]:
    apiserver.put_object("nodes", node_object())
    clock = ManualClock(1000.0)
    source = ClusterSource(client, NODE, clock=clock, stale_after_s=30.0)
    source.policies.start()
    source.pods.start()
    assert source.policies.wait_synced(5) and source.pods.wait_synced(5)
    yield source, clock
    source.stop()


def test_view_has_policies_this_nodes_pods_and_its_rack(apiserver: FakeApiServer, cluster: tuple[ClusterSource, ManualClock]) -> None:
    source, _ = cluster
    apiserver.put_object("powercappingpolicies", allocation_document("llama", {"GPU-a": 400}))
    stored = apiserver.put_object("pods", pod(UID))
    elsewhere = pod("99999999-0000-4000-8000-000000000000", name="other")
    elsewhere["spec"]["nodeName"] = "gpu-node-2"
    apiserver.put_object("pods", elsewhere)
    wait_until(lambda: len(source.view().policies) == 1 and len(source.view().pods_by_uid) == 1)
    assert not source.view().fresh  # synced, but the API server has not answered a probe yet
    assert source.probe()
    view = source.view()
    assert view.fresh and view.node_rack == "rack-a1"
    assert list(view.pods_by_uid) == [stored["metadata"]["uid"]]  # the server assigns UIDs
    assert view.policies[0].status["allocations"][0]["gpus"] == [{"uuid": "GPU-a", "watts": 400}]
    pod_requests = [r for r in apiserver.requests if r.path == "/api/v1/pods"]
    assert pod_requests and all("spec.nodeName=gpu-node-1" in str(r.query) for r in pod_requests)


def test_invalid_policy_in_the_cluster_is_skipped(apiserver: FakeApiServer, cluster: tuple[ClusterSource, ManualClock]) -> None:
    source, _ = cluster
    apiserver.put_object("powercappingpolicies", allocation_document("good", {"GPU-a": 400}))
    broken = policy_document("broken")
    broken["spec"]["powerCapLimit"] = -5
    apiserver.put_object("powercappingpolicies", broken)
    wait_until(lambda: source.policies.version >= 2)
    view = source.view()
    assert [p.name for p in view.policies] == ["good"]
    assert view.unreadable == {"inference/broken": "spec.powerCapLimit: must be watts greater than 0"}


def test_a_policy_this_agents_validator_refuses_is_read_for_what_enforcement_needs(
    apiserver: FakeApiServer, cluster: tuple[ClusterSource, ManualClock], caplog: pytest.LogCaptureFixture,
) -> None:
    """An algorithm installed in the webhook's image but not the agent's: the cap, the
    selector and the allocations still hold (logged once per version)."""
    source, _ = cluster
    document = allocation_document("llama", {"GPU-a": 400}, customAlgorithm={"name": "vendor-packing", "parameters": {"x": 1}})
    with caplog.at_level("WARNING", logger="nodeagent.sources"):
        apiserver.put_object("powercappingpolicies", document)
        wait_until(lambda: len(source.view().policies) == 1)
        for _ in range(3):
            view = source.view()
    assert view.unreadable == {} and view.policies[0].power_cap_w == 2000
    assert view.policies[0].status["allocations"][0]["gpus"] == [{"uuid": "GPU-a", "watts": 400}]
    refusals = [r for r in caplog.records if r.getMessage().startswith("policy refused by this agent's validator")]
    assert len(refusals) == 1 and 'unknown algorithm "vendor-packing"' in str(getattr(refusals[0], "error"))


def test_a_policy_that_cannot_be_read_keeps_its_last_good_version(
    apiserver: FakeApiServer, cluster: tuple[ClusterSource, ManualClock], caplog: pytest.LogCaptureFixture,
) -> None:
    source, _ = cluster
    apiserver.put_object("powercappingpolicies", allocation_document("llama", {"GPU-a": 400}, cap_w=1000))
    wait_until(lambda: len(source.view().policies) == 1)
    broken = allocation_document("llama", {"GPU-a": 400})
    del broken["spec"]["powerCapLimit"]
    with caplog.at_level("ERROR", logger="nodeagent.sources"):
        apiserver.put_object("powercappingpolicies", broken)
        wait_until(lambda: bool(source.view().unreadable))
        broken["metadata"]["labels"] = {"touched": "yes"}  # a new version, the same problem: said once
        apiserver.put_object("powercappingpolicies", broken)
        wait_until(lambda: source.policies.version >= 3)
        view = source.view()
    assert view.unreadable == {"inference/llama": "spec.powerCapLimit: is required"}
    assert [p.power_cap_w for p in view.policies] == [1000]  # the last good version, its GPUs' caps held
    assert [r.getMessage() for r in caplog.records] == ["policy unreadable: holding the caps of its GPUs"]
    apiserver.put_object("powercappingpolicies", allocation_document("llama", {"GPU-a": 400}, cap_w=900))
    wait_until(lambda: not source.view().unreadable)
    assert [p.power_cap_w for p in source.view().policies] == [900]


def test_a_dead_policy_watch_makes_the_view_stale_until_a_list_stands_in(
    apiserver: FakeApiServer, cluster: tuple[ClusterSource, ManualClock],
) -> None:
    """Every watch of policies fails while GETs answer: the Node probe alone would call the
    view fresh, and a lowered cap would never arrive."""
    source, clock = cluster
    apiserver.put_object("powercappingpolicies", allocation_document("llama", {"GPU-a": 400}, cap_w=1000))
    wait_until(lambda: len(source.view().policies) == 1)
    assert source.probe() and source.view().fresh
    apiserver.fail_next(1_000_000, 500, path=kube.policy_path(), watch=True)
    apiserver.close_watches()
    wait_until(lambda: not source.policies.connected, 5.0)
    assert source.probe()  # the API server answers GETs
    view = source.view()
    assert not view.fresh and view.problem is not None and view.problem.startswith("the policies watch is down (")
    apiserver.put_object("powercappingpolicies", allocation_document("llama", {"GPU-a": 250}, cap_w=600))
    source.list_while_watches_down()
    view = source.view()
    assert view.fresh and [p.power_cap_w for p in view.policies] == [600]
    clock.advance(31.0)
    assert source.probe()
    problem = source.view().problem  # a LIST as old as the API server's silence allowance: stale again
    assert problem is not None and problem.startswith("the policies watch is down (") and problem.endswith("; last listed 31 s ago)")
    apiserver.clear_faults()
    wait_until(lambda: source.policies.connected and source.policies.version >= 2, 10.0)
    source.list_while_watches_down()  # connected at one probe: the LIST still stands in
    assert [p.power_cap_w for p in source.view().policies] == [600]
    source.list_while_watches_down()  # and at the next: the cache again
    view = source.view()
    assert view.fresh and [p.power_cap_w for p in view.policies] == [600]


def test_api_server_gone_makes_the_view_stale_and_nothing_raises(
    apiserver: FakeApiServer, cluster: tuple[ClusterSource, ManualClock]
) -> None:
    source, clock = cluster
    assert source.probe() and source.view().fresh and source.view().problem is None
    apiserver.stop()
    assert source.probe() is False
    # the watches broke with the server: stale at once, not after 30 s of silence
    wait_until(lambda: not source.policies.connected and not source.pods.connected, 5.0)
    source.list_while_watches_down()  # and a LIST cannot stand in for them
    view = source.view()
    assert view.fresh is False and view.problem is not None
    assert view.problem.startswith("the policies watch is down (") and "; list failed too: " in view.problem
    clock.advance(31.0)
    view = source.view()
    assert view.fresh is False
    assert view.problem is not None and view.problem.startswith("no answer from the API server for 31 s (")


@pytest.fixture
def simulated() -> tuple[SimulatedBackend, ManualClock]:
    clock = ManualClock(1000.0)
    backend = SimulatedBackend([physics.H200_LIKE, physics.H200_LIKE], clock=clock, uuid_prefix="GPU-sim")
    return backend, clock


def test_agent_enforces_publishes_telemetry_and_events(
    apiserver: FakeApiServer, client: KubeClient, simulated: tuple[SimulatedBackend, ManualClock]
) -> None:
    backend, clock = simulated
    uuids = [d.uuid for d in backend.devices()]
    apiserver.put_object("nodes", node_object())
    apiserver.put_object("powercappingpolicies", allocation_document("llama", {uuids[0]: 400, uuids[1]: 450}))
    source = ClusterSource(client, NODE, clock=clock)
    source.policies.start()
    source.pods.start()
    assert source.policies.wait_synced(5) and source.pods.wait_synced(5) and source.probe()
    publisher = KubePublisher(client, NODE, background=False, settings=PublishSettings(min_interval_s=5.0))
    agent = Agent(backend, source, AgentSettings(node=NODE), publisher=publisher, clock=clock)
    try:
        clock.advance(1.0)
        agent.tick()
        assert [backend.snapshot(i).requested_limit_w for i in (0, 1)] == [400, 450]
        published = apiserver.get_object("powercapnodes", NODE)
        assert published is not None
        assert publisher.last_sent is not None and (
            to_document(from_document(published["status"])) == to_document(publisher.last_sent))
        assert published["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": apiserver.get_object("nodes", NODE)["metadata"]["uid"]}]
        telemetry = from_document(published["status"])
        assert [(g.uuid, g.limit_w) for g in telemetry.gpus] == [(uuids[0], 400), (uuids[1], 450)]
        assert not apiserver.requests_to("PATCH", f"/api/v1/nodes/{NODE}"), "the agent never writes its Node"
        assert TELEMETRY_ANNOTATION not in (apiserver.get_object("nodes", NODE)["metadata"].get("annotations") or {})
        status_path = f"/apis/powercapping.example.com/v1alpha1/powercapnodes/{NODE}/status"
        patches = len(apiserver.requests_to("PATCH", status_path))
        clock.advance(1.0)
        agent.tick()  # within the minimum interval, nothing moved: no patch
        assert len(apiserver.requests_to("PATCH", status_path)) == patches
        events = apiserver.objects("events", "inference")
        assert [e["reason"] for e in events] == ["PowerCapChanged"]  # two changes, one Event a minute
        assert events[0]["regarding"]["name"] == "llama" and events[0]["regarding"]["kind"] == "PowerCappingPolicy"
        assert "700 W -> 400 W" in events[0]["note"]
        apiserver.stop()  # the API server goes away: ticks go on, caps stay
        clock.advance(40.0)
        source.probe()
        backend.set_workload(0, physics.Workload(load=1.0))
        for _ in range(3):
            clock.advance(1.0)
            agent.tick()
        assert [backend.snapshot(i).requested_limit_w for i in (0, 1)] == [400, 450]
        assert agent.status()["policyFresh"] is False
    finally:
        source.stop()


def test_a_lowered_allocation_is_published_at_once_and_a_raise_waits(
    apiserver: FakeApiServer, client: KubeClient, simulated: tuple[SimulatedBackend, ManualClock]
) -> None:
    """The controller raises a GPU with the watts another gave up only once the PowerCapNode
    shows the lower in force: the tick that applies it publishes 1 s after the last patch;
    the raise that follows waits for the minimum interval, as any other change."""
    backend, clock = simulated
    uuids = [d.uuid for d in backend.devices()]
    apiserver.put_object("nodes", node_object())
    source = StaticSource()
    publisher = KubePublisher(client, NODE, background=False, settings=PublishSettings(min_interval_s=5.0))
    agent = Agent(backend, source, AgentSettings(node=NODE), publisher=publisher, clock=clock)
    status_path = f"/apis/powercapping.example.com/v1alpha1/powercapnodes/{NODE}/status"

    def published_limits_w() -> list[float]:
        published = apiserver.get_object("powercapnodes", NODE)
        assert published is not None
        return [g.limit_w for g in from_document(published["status"]).gpus]

    source.set(policy(caps_w={uuids[0]: 400, uuids[1]: 450}))
    clock.advance(1.0)
    agent.tick()
    assert published_limits_w() == [400, 450]
    patches = len(apiserver.requests_to("PATCH", status_path))
    source.set(policy(caps_w={uuids[0]: 300, uuids[1]: 450}))
    clock.advance(1.0)
    agent.tick()
    assert published_limits_w() == [300, 450]
    assert len(apiserver.requests_to("PATCH", status_path)) == patches + 1
    source.set(policy(caps_w={uuids[0]: 300, uuids[1]: 550}))
    clock.advance(1.0)
    agent.tick()
    assert backend.snapshot(1).requested_limit_w == 550
    assert len(apiserver.requests_to("PATCH", status_path)) == patches + 1, "a raise waits for the minimum interval"
    clock.advance(4.0)
    agent.tick()
    assert published_limits_w() == [300, 550]


@pytest.mark.parametrize(
    ("after_s", "lowered", "published"),
    [
        pytest.param(1.0, True, True, id="lowered-1s-after"),
        pytest.param(1.0, False, False, id="other-change-1s-after"),
        pytest.param(5.0, False, True, id="other-change-after-the-minimum-interval"),
    ],
)
def test_only_a_lowered_telemetry_skips_the_minimum_interval(
    apiserver: FakeApiServer, client: KubeClient, after_s: float, lowered: bool, published: bool,
) -> None:
    from datetime import datetime, timezone

    from powercap.telemetry import NodeTelemetry

    apiserver.put_object("nodes", node_object())
    publisher = KubePublisher(client, NODE, background=False, settings=PublishSettings(min_interval_s=5.0))
    publisher.telemetry(NodeTelemetry(datetime.now(timezone.utc), 1000.0, None), 0.0)
    publisher.telemetry(NodeTelemetry(datetime.now(timezone.utc), 800.0, None), after_s, lowered=lowered)
    assert publisher.last_sent is not None and publisher.last_sent.power_w == (800.0 if published else 1000.0)


def test_a_lowered_telemetry_still_waits_out_the_backoff(apiserver: FakeApiServer, client: KubeClient) -> None:
    """Urgent or not, a failing API server gets one patch per backoff, not one per tick."""
    from datetime import datetime, timezone

    from powercap.telemetry import NodeTelemetry

    apiserver.put_object("nodes", node_object())
    apiserver.fail_next(10_000, 503, method="PATCH")
    publisher = KubePublisher(client, NODE, background=False, settings=PublishSettings(min_interval_s=5.0))
    patch_path = f"/apis/powercapping.example.com/v1alpha1/powercapnodes/{NODE}/status"
    for second in range(120):
        publisher.telemetry(NodeTelemetry(datetime.now(timezone.utc), 100.0 + second, None), float(second), lowered=True)
    attempts = len(apiserver.requests_to("PATCH", patch_path))
    assert 3 <= attempts <= 6, f"{attempts} patches in 120 ticks"
    assert publisher.last_sent is None


def test_events_are_rate_limited_per_policy_and_reason(apiserver: FakeApiServer, client: KubeClient) -> None:
    from powercap.policies import parse_policy

    publisher = KubePublisher(client, NODE, background=False, event_interval_s=60.0)
    owner = parse_policy(policy_document("llama"))
    for second in (0.0, 10.0, 20.0, 61.0):
        publisher.event(owner, "PowerCapChanged", f"change at {second:g}", "Normal", second)
    publisher.event(owner, "ThermalEmergency", "hot", "Warning", 62.0)
    events = sorted(apiserver.objects("events", "inference"), key=lambda e: e["eventTime"])
    assert [(e["reason"], e["type"]) for e in events] == [
        ("PowerCapChanged", "Normal"), ("PowerCapChanged", "Normal"), ("ThermalEmergency", "Warning"),
    ]
    assert "2 similar" in events[1]["note"]


def test_background_publisher_never_blocks_or_raises_when_unreachable() -> None:
    from datetime import datetime, timezone

    from powercap.telemetry import NodeTelemetry

    with KubeClient.for_server("http://127.0.0.1:9", connect_timeout_s=0.2, read_timeout_s=0.2) as dead:
        publisher = KubePublisher(dead, NODE)
        publisher.start()
        started = time.perf_counter()
        publisher.telemetry(NodeTelemetry(datetime.now(timezone.utc), 0.0, None), 0.0)
        assert time.perf_counter() - started < 0.05
        publisher.stop()
        assert publisher.last_sent is None


@pytest.mark.parametrize(
    ("fault", "level", "says"),
    [
        pytest.param("down", "WARNING", "telemetry not published: 503 ServiceUnavailable", id="apiserver-down"),
        pytest.param("deleted", "WARNING", f"telemetry not published: Node {NODE} or the PowerCapNode resource not found",
                     id="node-deleted"),
        pytest.param(
            "forbidden", "ERROR",
            'missing RBAC permission: patch powercapnodes/status in API group "powercapping.example.com" at the cluster scope',
            id="403",
        ),
    ],
)
def test_failing_telemetry_patches_back_off_and_say_why_once(
    apiserver: FakeApiServer, client: KubeClient, caplog: pytest.LogCaptureFixture, fault: str, level: str, says: str,
) -> None:
    """Two minutes of ticks against an API server that refuses every patch: a handful of
    requests, one log line naming the problem, and the first tick after it is fixed publishes."""
    from datetime import datetime, timezone

    from powercap.telemetry import NodeTelemetry

    if fault != "deleted":
        apiserver.put_object("nodes", node_object())
        apiserver.fail_next(10_000, 503 if fault == "down" else 403, method="PATCH")
    publisher = KubePublisher(client, NODE, background=False, settings=PublishSettings(min_interval_s=5.0))
    patch_path = f"/apis/powercapping.example.com/v1alpha1/powercapnodes/{NODE}/status"
    with caplog.at_level("DEBUG", logger="nodeagent.publisher"):
        for second in range(120):
            publisher.telemetry(NodeTelemetry(datetime.now(timezone.utc), 100.0 + second, None), float(second))
        attempts = len(apiserver.requests_to("PATCH", patch_path))
        assert 3 <= attempts <= 6, f"{attempts} patches in 120 ticks"
        loud = [r for r in caplog.records if r.levelno >= 30]
        assert len(loud) == 1 and loud[0].levelname == level and says in loud[0].getMessage()
        assert publisher.last_sent is None

        apiserver.clear_faults()
        apiserver.put_object("nodes", node_object())
        for second in range(120, 240):
            publisher.telemetry(NodeTelemetry(datetime.now(timezone.utc), 100.0 + second, None), float(second))
            if publisher.last_sent is not None:
                break
    assert publisher.last_sent is not None and second <= 120 + 60, "published within a minute of the fix"
    assert any(r.getMessage() == "telemetry published again" for r in caplog.records)


def test_a_deleted_node_is_named_in_the_log_and_caps_are_kept(
    apiserver: FakeApiServer, cluster: tuple[ClusterSource, ManualClock], caplog: pytest.LogCaptureFixture
) -> None:
    source, clock = cluster
    assert source.probe()
    apiserver.delete_object("nodes", NODE)
    with caplog.at_level("WARNING", logger="nodeagent.sources"):
        assert source.probe() is False
    assert [r.getMessage() for r in caplog.records] == [f"Node {NODE} not found (deleted?): keeping caps"]
    clock.advance(31.0)
    assert source.view().fresh is False


def test_a_pod_loading_its_model_owns_its_gpu_in_the_nodes_telemetry(
    apiserver: FakeApiServer, client: KubeClient, simulated: tuple[SimulatedBackend, ManualClock],
) -> None:
    """The chain a new pod goes through: the pod from the API server's watch, its GPU from
    the kubelet's pod-resources API (no process on the GPU yet), the pair in the node's
    PowerCapNode that the budget controller reads."""
    backend, clock = simulated
    uuids = [d.uuid for d in backend.devices()]
    apiserver.put_object("nodes", node_object())
    apiserver.put_object("powercappingpolicies", policy_document("llama"))  # no allocation yet
    apiserver.put_object("pods", pod(UID))
    kubelet = FakeKubelet()
    kubelet.assignments = {"inference/llama-0": {"server": {"nvidia.com/gpu": [uuids[1]]}}}
    kubelet.start()
    source = ClusterSource(client, NODE, clock=clock)
    source.policies.start()
    source.pods.start()
    publisher = KubePublisher(client, NODE, background=False)
    agent = Agent(backend, source, AgentSettings(node=NODE), publisher=publisher, clock=clock,
                  pod_resources=PodResourcesSource(kubelet.socket_path))
    try:
        assert source.policies.wait_synced(5) and source.pods.wait_synced(5) and source.probe()
        clock.advance(1.0)
        agent.tick()
        published = apiserver.get_object("powercapnodes", NODE)
        assert published is not None
        telemetry = from_document(published["status"])
        assert [(g.uuid, g.pod) for g in telemetry.gpus] == [(uuids[0], None), (uuids[1], "inference/llama-0")]
        # the pod's policy holds its GPU at the minimum until the controller allocates it
        assert [backend.snapshot(i).requested_limit_w for i in (0, 1)] == [700, 200]
    finally:
        agent.close()
        kubelet.remove()
