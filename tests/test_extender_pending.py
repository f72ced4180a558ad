"""Pods the extender passed a moment ago, through its HTTP app, as kube-scheduler sees them.

kube-scheduler binds asynchronously and filters the next pod at once, before the previous
pod's binding reaches the extender's Pod watch (whose cache lists bound pods only). So the
extender remembers each pod its filter passed, with its estimate in every rack with a
maxPower it was passed into, until the view shows the pod bound or 30 s pass
(``extender.state.RecentAdmissions``, ``refuse_past_pending``). And prioritize scores a pod
on the view its filter call used while that is at most 1 s old (``extender.app.FilterViews``).

The app runs with a source whose view the tests replace (what the watch caches would show
next) and a clock the tests move (``time.monotonic`` as ``extender.app`` sees it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from flask.testing import FlaskClient

from extender.app import create_app
from powercap.algorithms import AlgorithmRegistry
from powercap.cluster import ClusterView
from tests.fakes.clusters import view
from tests.fakes.objects import NOW, extender_args, gpu_node, gpu_pod, policy, telemetry

# Budget never binds here (powerCapLimit 100 kW): only the racks' maxPower does. A pod's
# estimate is 1 GPU x min(100000 W / GPUs of the service, the GPU maximum 700 W) = 700 W,
# or its power-watts annotation.
CAP_W = 100_000
TELEMETRY_AT = NOW - timedelta(seconds=10)
BOUND_AT = NOW - timedelta(seconds=5)  # after the telemetry: assumed until telemetry lists the pod


class Clock:
    """``time.monotonic`` for the app under test: moved by hand."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class Cluster:
    """A ViewSource whose view the test replaces, as the watch caches would move it: Nodes,
    bound pods only, policies."""

    def __init__(self, nodes: Sequence[dict[str, Any]], policies: Sequence[dict[str, Any]]) -> None:
        self.policies = list(policies)
        self.view = view(nodes, [], self.policies)

    def show(self, nodes: Sequence[dict[str, Any]], bound: Sequence[dict[str, Any]] = ()) -> None:
        self.view = view(nodes, bound, self.policies)

    def current(self) -> ClusterView:
        return self.view

    def readiness(self) -> str | None:
        return None

    def start(self) -> None: ...

    def stop(self) -> None: ...


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("extender.app.time", SimpleNamespace(monotonic=fake, perf_counter=time.perf_counter))
    return fake


def extender(cluster: Cluster) -> FlaskClient:
    registry = AlgorithmRegistry.default(discover=lambda: [])
    return create_app(cluster, registry).test_client()


def node(name: str, rack: str | None, power_w: float, *, pods: Sequence[str | None] = (),
         at: datetime = TELEMETRY_AT, inlet_c: float = 24.0) -> dict[str, Any]:
    return gpu_node(name, rack, telemetry(power_w, at=at, pods=pods, inlet_c=inlet_c))


def llama(racks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return policy("llama", cap_w=CAP_W, racks=racks)


def pod(name: str, power_watts: str | None = None) -> dict[str, Any]:
    return gpu_pod(name, power_watts=power_watts)


def bound(name: str, node_name: str, power_watts: str | None = None, *, at: datetime = BOUND_AT) -> dict[str, Any]:
    return gpu_pod(name, node=node_name, bound_at=at, power_watts=power_watts)


def filter_(client: FlaskClient, pod_: dict[str, Any], nodes: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(passed, failed) of one filter call in NodeNames mode."""
    body = extender_args(pod_, [{"metadata": {"name": n}} for n in nodes], node_cache_capable=True)
    answer = client.post("/filter", data=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200
    result = answer.get_json()
    assert result["Error"] == "" and result["FailedAndUnresolvableNodes"] == {}
    return result["NodeNames"], result["FailedNodes"]


def scores(client: FlaskClient, pod_: dict[str, Any], nodes: Sequence[str]) -> dict[str, int]:
    body = extender_args(pod_, [{"metadata": {"name": n}} for n in nodes], node_cache_capable=True)
    answer = client.post("/prioritize", data=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200
    return {entry["Host"]: entry["Score"] for entry in answer.get_json()}


def by(policy_key: str = "inference/llama") -> str:
    return f"(set by policy {policy_key})"


# -- two pods back to back


def test_the_next_pod_is_refused_in_the_rack_the_one_before_filled_until_its_binding_shows(clock: Clock) -> None:
    """rack-1 has room for 1000 W: llama-a (600 W) fits, llama-b (700 W) no longer does
    while llama-a's binding is on its way; rack-2 has room for both."""
    nodes = [node("gpu-1", "rack-1", 1000), node("gpu-2", "rack-2", 1000)]
    cluster = Cluster(nodes, [llama([{"rackId": "rack-1", "maxPower": 2000}, {"rackId": "rack-2", "maxPower": 8000}])])
    client = extender(cluster)
    first, second = pod("llama-a", power_watts="600"), pod("llama-b")

    assert filter_(client, first, ["gpu-1", "gpu-2"]) == (["gpu-1", "gpu-2"], {})
    clock.now_s += 0.05
    assert filter_(client, second, ["gpu-1", "gpu-2"]) == (["gpu-2"], {
        "gpu-1": f"rack-1: 1000 W in use + 600 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 2000 W {by()}",
    })
    # llama-a tried again (kube-scheduler chose no node for it): its own charge never refuses it
    assert filter_(client, first, ["gpu-1", "gpu-2"]) == (["gpu-1", "gpu-2"], {})

    # the refusal is counted with the rack refusals
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'powercap_extender_nodes_rejected_total{reason="power"} 1.0' in metrics

    # llama-a's binding shows (on gpu-2): its charge in rack-1 is gone, llama-b fits there
    cluster.show(nodes, [bound("llama-a", "gpu-2", power_watts="600")])
    clock.now_s += 0.05
    assert filter_(client, second, ["gpu-1", "gpu-2"]) == (["gpu-1", "gpu-2"], {})


def test_pods_placed_a_moment_ago_add_up_and_the_binding_takes_over_from_the_charge(clock: Clock) -> None:
    """rack-1: 1000 W in use, maxPower 2400 W, room for two 700 W pods."""
    empty = node("gpu-1", "rack-1", 1000)
    cluster = Cluster([empty], [llama([{"rackId": "rack-1", "maxPower": 2400}])])
    client = extender(cluster)
    a, b, c = pod("llama-a"), pod("llama-b"), pod("llama-c")

    assert filter_(client, a, ["gpu-1"]) == (["gpu-1"], {})
    assert filter_(client, b, ["gpu-1"]) == (["gpu-1"], {})  # 1000 + 700 + 700 = 2400: at the limit passes
    assert filter_(client, c, ["gpu-1"]) == ([], {
        "gpu-1": f"rack-1: 1000 W in use + 1400 W for 2 pods placed a moment ago + 700 W for this pod > maxPower 2400 W {by()}",
    })

    # llama-a bound, no telemetry since: its assumed power replaces its charge (counted once;
    # this message does not split the assumed part out of "in use")
    cluster.show([empty], [bound("llama-a", "gpu-1")])
    assert filter_(client, c, ["gpu-1"]) == ([], {
        "gpu-1": f"rack-1: 1700 W in use + 700 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 2400 W {by()}",
    })

    # the agent reports llama-a's GPU: measured power replaces the assumed
    measured = node("gpu-1", "rack-1", 1700, pods=["inference/llama-a"], at=NOW - timedelta(seconds=1))
    cluster.show([measured], [bound("llama-a", "gpu-1")])
    assert filter_(client, c, ["gpu-1"]) == ([], {
        "gpu-1": f"rack-1: 1700 W in use + 700 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 2400 W {by()}",
    })

    # llama-b bound too, after that telemetry: no pod is pending any more, the rack's own
    # figures refuse llama-c
    cluster.show([measured], [bound("llama-a", "gpu-1"), bound("llama-b", "gpu-1", at=NOW)])
    assert filter_(client, c, ["gpu-1"]) == ([], {
        "gpu-1": "rack-1: 2400 W in use (incl. 700 W assumed for 1 pod bound since the last telemetry) "
                 f"+ 700 W for this pod > maxPower 2400 W {by()}",
    })


@pytest.mark.parametrize("shown", [
    pytest.param("assumed", id="binding-shown-before-telemetry"),
    pytest.param("measured", id="telemetry-lists-the-pod"),
])
def test_a_pod_the_view_shows_bound_is_not_counted_twice(clock: Clock, shown: str) -> None:
    """rack-1 has room for exactly two 700 W pods: once llama-a shows bound, llama-b still
    fits (1000 + 700 + 700 = 2400 W), which a charge on top of the bound pod would refuse."""
    cluster = Cluster([node("gpu-1", "rack-1", 1000)], [llama([{"rackId": "rack-1", "maxPower": 2400}])])
    client = extender(cluster)
    assert filter_(client, pod("llama-a"), ["gpu-1"]) == (["gpu-1"], {})

    if shown == "assumed":
        cluster.show([node("gpu-1", "rack-1", 1000)], [bound("llama-a", "gpu-1")])
    else:
        cluster.show([node("gpu-1", "rack-1", 1700, pods=["inference/llama-a"], at=NOW - timedelta(seconds=1))],
                     [bound("llama-a", "gpu-1")])
    clock.now_s += 0.05
    assert filter_(client, pod("llama-b"), ["gpu-1"]) == (["gpu-1"], {})


# -- a pod kube-scheduler never bound


def test_a_pod_never_bound_frees_its_room_after_30_s(clock: Clock) -> None:
    """rack-1 has room for one 700 W pod; llama-a passed and was never bound (a later
    plugin refused it, or it was deleted): it holds the room for 30 s, not longer."""
    cluster = Cluster([node("gpu-1", "rack-1", 1000)], [llama([{"rackId": "rack-1", "maxPower": 1700}])])
    client = extender(cluster)
    assert filter_(client, pod("llama-a"), ["gpu-1"]) == (["gpu-1"], {})
    refused: tuple[list[str], dict[str, str]] = ([], {
        "gpu-1": f"rack-1: 1000 W in use + 700 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 1700 W {by()}",
    })

    clock.now_s += 1
    assert filter_(client, pod("llama-b"), ["gpu-1"]) == refused
    clock.now_s += 29  # exactly 30 s: still held
    assert filter_(client, pod("llama-b"), ["gpu-1"]) == refused
    clock.now_s += 0.01
    assert filter_(client, pod("llama-b"), ["gpu-1"]) == (["gpu-1"], {})


# -- several racks


def test_a_pod_passed_into_two_racks_holds_room_in_both_until_bound(clock: Clock) -> None:
    """The extender does not learn which node kube-scheduler picks: llama-a, passed into
    rack-1 and rack-2 (room for one pod each), holds both until its binding shows."""
    nodes = [node("gpu-1", "rack-1", 1000), node("gpu-2", "rack-2", 1200)]
    cluster = Cluster(nodes, [llama([{"rackId": "rack-1", "maxPower": 1700}, {"rackId": "rack-2", "maxPower": 1900}])])
    client = extender(cluster)
    assert filter_(client, pod("llama-a"), ["gpu-1", "gpu-2"]) == (["gpu-1", "gpu-2"], {})

    clock.now_s += 0.05
    assert filter_(client, pod("llama-b"), ["gpu-1", "gpu-2"]) == ([], {
        "gpu-1": f"rack-1: 1000 W in use + 700 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 1700 W {by()}",
        "gpu-2": f"rack-2: 1200 W in use + 700 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 1900 W {by()}",
    })

    # bound on gpu-2: rack-1's room is free again, rack-2's is taken by the pod itself
    cluster.show(nodes, [bound("llama-a", "gpu-2")])
    clock.now_s += 0.05
    assert filter_(client, pod("llama-b"), ["gpu-1", "gpu-2"]) == (["gpu-1"], {
        "gpu-2": "rack-2: 1900 W in use (incl. 700 W assumed for 1 pod bound since the last telemetry) "
                 f"+ 700 W for this pod > maxPower 1900 W {by()}",
    })


def test_racks_without_max_power_are_not_affected(clock: Clock) -> None:
    """rack-1 has room for one pod; rack-t has only a maxTemperature; gpu-loose is in no
    rack. llama-a passes all three; llama-b is refused in rack-1 only, and what llama-b was
    passed into holds nothing in rack-1."""
    nodes = [node("gpu-1", "rack-1", 1000), node("gpu-t", "rack-t", 5000), node("gpu-loose", None, 5000)]
    racks = [{"rackId": "rack-1", "maxPower": 1700}, {"rackId": "rack-t", "maxTemperature": 30}]
    client = extender(Cluster(nodes, [llama(racks)]))
    names = ["gpu-1", "gpu-t", "gpu-loose"]
    assert filter_(client, pod("llama-a"), names) == (names, {})

    one_pending = {
        "gpu-1": f"rack-1: 1000 W in use + 700 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 1700 W {by()}",
    }
    clock.now_s += 0.05
    assert filter_(client, pod("llama-b"), names) == (["gpu-t", "gpu-loose"], one_pending)
    clock.now_s += 0.05
    assert filter_(client, pod("llama-c"), names) == (["gpu-t", "gpu-loose"], one_pending)


def test_pods_of_other_policies_count_and_the_message_names_the_policy_that_set_the_limit(clock: Clock) -> None:
    """A pod of policy mistral passed into rack-1, whose maxPower llama sets, holds room
    there for llama's pods too."""
    mistral_labels = {"app.kubernetes.io/name": "mistral"}
    mistral = policy("mistral", cap_w=CAP_W, selector={"matchLabels": mistral_labels})
    cluster = Cluster([node("gpu-1", "rack-1", 1000)], [llama([{"rackId": "rack-1", "maxPower": 1700}]), mistral])
    client = extender(cluster)
    assert filter_(client, gpu_pod("mistral-a", labels=mistral_labels, power_watts="500"), ["gpu-1"]) == (["gpu-1"], {})
    clock.now_s += 0.05
    assert filter_(client, pod("llama-a"), ["gpu-1"]) == ([], {
        "gpu-1": f"rack-1: 1000 W in use + 500 W for 1 pod placed a moment ago + 700 W for this pod > maxPower 1700 W {by()}",
    })


# -- prioritize scores on the filter's view


def test_prioritize_scores_on_the_view_its_filter_call_used_for_up_to_1_s(clock: Clock) -> None:
    """A change the source shows between a pod's filter and prioritize calls (the previous
    pod's binding, new telemetry) does not move that pod's scores within 1 s; after 1 s,
    or for another pod, the source's current view is scored."""
    racks = [{"rackId": "rack-1", "maxPower": 8000}, {"rackId": "rack-2", "maxPower": 8000}]
    before = [node("gpu-1", "rack-1", 1000), node("gpu-2", "rack-2", 5000)]
    after = [node("gpu-1", "rack-1", 6000), node("gpu-2", "rack-2", 1000)]
    names = ["gpu-1", "gpu-2"]
    a, b = pod("llama-a"), pod("llama-b")
    scores_before = scores(extender(Cluster(before, [llama(racks)])), a, names)
    scores_after = scores(extender(Cluster(after, [llama(racks)])), a, names)
    assert scores_before != scores_after

    cluster = Cluster(before, [llama(racks)])
    client = extender(cluster)
    assert filter_(client, a, names) == (names, {})
    cluster.show(after)
    clock.now_s += 0.5
    assert scores(client, a, names) == scores_before
    assert scores(client, b, names) == scores_after  # no filter call of its own
    recreated = {**a, "metadata": {**a["metadata"], "uid": "another-uid"}}
    assert scores(client, recreated, names) == scores_after  # same name, another pod
    clock.now_s += 0.5  # exactly 1 s
    assert scores(client, a, names) == scores_before
    clock.now_s += 0.01
    assert scores(client, a, names) == scores_after
