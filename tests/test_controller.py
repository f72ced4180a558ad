"""The budget controller against the fake API server (real HTTP, the API's JSON)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.loop import (
    BudgetController,
    CacheSnapshots,
    ControllerSettings,
    ListSnapshots,
)
from controller.cli import health_routes
from powercap.runtime.httpserver import HttpServer
from powercap import kube, schema
from powercap.algorithms import AlgorithmRegistry
from powercap.commands import main
from powercap.cluster import ClusterSettings
from powercap.telemetry import TELEMETRY_ANNOTATION, from_json, to_json
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.clusters import Gpu, agents_apply, node
from tests.fakes.objects import NOW, gpu_pod, kubectl_list, policy

LLAMA = {"app.kubernetes.io/name": "llama"}
POLICY_PATH = kube.policy_path("inference", "llama")
STATUS_PATH = kube.status_path(POLICY_PATH)
ENERGY_AWARE = {"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 3500, "migrationInterval": 600}}


class Clock:
    """One fake clock for the elector (seconds) and the snapshots (datetimes)."""

    def __init__(self) -> None:
        self.now_s = NOW.timestamp()

    def __call__(self) -> float:
        return self.now_s

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now_s, timezone.utc)

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def client(apiserver: FakeApiServer) -> Iterator[kube.KubeClient]:
    with kube.KubeClient.for_server(apiserver.url) as api:
        yield api


def serve_cluster(apiserver: FakeApiServer, *, cap_w: int = 2000, algorithm: dict | None = None,
                  mode: str | None = None, hot: bool = False) -> None:
    """gpu-1: llama-0 busy on 2 GPUs (and, ``hot``, llama-1 on 2 more plus other load);
    gpu-2: llama-2 idle on 2 GPUs."""
    gpu_1 = [Gpu("A0", 690, 700, "inference/llama-0"), Gpu("A1", 690, 700, "inference/llama-0")]
    pods = [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("llama-2", gpus=2, node="gpu-2", labels=LLAMA)]
    if hot:
        gpu_1 += [Gpu("A2", 500, 700, "inference/llama-1"), Gpu("A3", 500, 700, "inference/llama-1")]
        pods.append(gpu_pod("llama-1", gpus=2, node="gpu-1", labels=LLAMA))
    nodes = [
        node("gpu-1", "rack-1", gpu_1, extra_power_w=1700 if hot else 0),
        node("gpu-2", "rack-1", [Gpu("B0", 90, 700, "inference/llama-2"), Gpu("B1", 90, 700, "inference/llama-2")]),
    ]
    for obj in nodes:
        apiserver.put_object("nodes", obj)
    for obj in pods:
        apiserver.put_object("pods", obj)
    apiserver.put_object("powercappingpolicies", policy("llama", cap_w=cap_w, algorithm=algorithm, mode=mode))


def controller_for(client: kube.KubeClient, clock: Clock, is_leader: Callable[[], bool] = lambda: True,
                   identity: str = "controller-a", **settings: Any) -> BudgetController:
    snapshots = ListSnapshots(client, ClusterSettings(), AlgorithmRegistry.default(), clock=clock.datetime)
    return BudgetController(client, snapshots, ControllerSettings(identity=identity, **settings), is_leader=is_leader,
                            clock=clock)


def stored_status(apiserver: FakeApiServer) -> dict[str, Any]:
    stored = apiserver.get_object("powercappingpolicies", "llama", "inference")
    assert stored is not None
    return stored.get("status") or {}


def events(apiserver: FakeApiServer) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e["regarding"]["name"]) for e in apiserver.objects("events", "inference")]


def agents_catch_up(apiserver: FakeApiServer, at: datetime) -> None:
    for updated in agents_apply(apiserver.objects("nodes"), apiserver.objects("powercappingpolicies"), at=at):
        apiserver.put_object("nodes", updated)


def test_status_is_written_through_the_subresource_retrying_a_conflict(client, apiserver) -> None:
    serve_cluster(apiserver)
    apiserver.conflict_next_put(STATUS_PATH)
    report = controller_for(client, Clock()).run_round()
    assert report.written == ["inference/llama"]
    assert len(apiserver.requests_to("PUT", STATUS_PATH)) == 2  # 409, then read again and written
    assert not apiserver.requests_to("PUT", POLICY_PATH)  # never the main resource
    status = stored_status(apiserver)
    assert status["allocations"] == [
        {"node": "gpu-1", "gpus": [{"uuid": "A0", "watts": 700}, {"uuid": "A1", "watts": 700}], "watts": 1400},
        {"node": "gpu-2", "gpus": [{"uuid": "B0", "watts": 300}, {"uuid": "B1", "watts": 300}], "watts": 600},
    ]  # the idle GPUs share what the busy ones leave of the whole 2000 W powerCapLimit: 2000 - 1400 = 600 W
    assert (status["gpus"], status["powerW"], status["budgetW"]) == (4, 1560, 2000)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "Feasible": "True", "Enforced": "True"}


def test_a_lease_lost_while_retrying_a_conflict_stops_the_write(client, apiserver) -> None:
    serve_cluster(apiserver)
    apiserver.conflict_next_put(STATUS_PATH)
    answers = [True, True]  # leading at the round's check and at the first attempt; lost after the 409
    controller = controller_for(client, Clock(), is_leader=lambda: answers.pop(0) if answers else False)
    report = controller.run_round()
    assert report.written == [] and report.failed == []
    assert len(apiserver.requests_to("PUT", STATUS_PATH)) == 1, "no write after the Lease was lost"
    assert stored_status(apiserver) == {}


class DeletedBeforeTheWrite:
    """Snapshots that delete the policy right after the round took its snapshot."""

    def __init__(self, client: kube.KubeClient, apiserver: FakeApiServer, clock: Clock) -> None:
        self._inner = ListSnapshots(client, ClusterSettings(), AlgorithmRegistry.default(), clock=clock.datetime)
        self._apiserver = apiserver

    def snapshot(self) -> Any:
        taken = self._inner.snapshot()
        self._apiserver.delete_object("powercappingpolicies", "llama", "inference")
        return taken


@pytest.mark.parametrize(
    ("fault", "failed", "level", "says"),
    [
        pytest.param("deleted", [], "INFO", "status of inference/llama not written: the policy was deleted", id="404"),
        pytest.param(422, ["inference/llama"], "WARNING", "422 Invalid: injected fault 422", id="422"),
        pytest.param(
            403, ["inference/llama"], "ERROR",
            'missing RBAC permission: update powercappingpolicies/status in API group "powercapping.example.com" '
            'in namespace "inference"',
            id="403",
        ),
    ],
)
def test_a_refused_status_write_is_logged_and_the_round_goes_on(
    client, apiserver, caplog: pytest.LogCaptureFixture, fault: Any, failed: list[str], level: str, says: str,
) -> None:
    serve_cluster(apiserver)
    apiserver.put_object("powercappingpolicies", policy("mistral", "batch", cap_w=900))
    clock = Clock()
    controller = controller_for(client, clock)
    if fault == "deleted":
        controller = BudgetController(client, DeletedBeforeTheWrite(client, apiserver, clock),  # type: ignore[arg-type]
                                      ControllerSettings(identity="controller-a"), clock=clock)
    else:
        apiserver.fail_next(1, fault, method="PUT", path=STATUS_PATH)
    with caplog.at_level("INFO", logger="controller"):
        report = controller.run_round()
    assert report.failed == failed
    assert "batch/mistral" in report.written, "the other policies are still written"
    (record,) = [r for r in caplog.records if says in r.getMessage()]
    assert record.levelname == level
    assert controller.metrics.write_failures._value.get() == len(failed)  # noqa: SLF001 - the counter's value
    assert len(apiserver.requests_to("PUT", STATUS_PATH)) == (0 if fault == "deleted" else 1), "no retry loop"
    if fault != "deleted":
        clock.advance(5)
        assert "inference/llama" in controller.run_round().written  # the next round writes it


def test_objects_of_odd_shapes_never_stop_a_round(client, apiserver) -> None:
    """Fields the API server leaves out or sends as null: the round still writes every status."""
    serve_cluster(apiserver)
    apiserver.put_object("nodes", {"metadata": {"name": "bare", "labels": None, "annotations": None}, "status": None})
    odd_pod = gpu_pod("odd", gpus=1, node="gpu-2", labels=LLAMA)
    odd_pod["metadata"]["ownerReferences"] = None
    odd_pod["spec"]["containers"][0]["resources"] = None
    odd_pod["status"] = None
    apiserver.put_object("pods", odd_pod)
    junk_status = {"allocations": [None, {"node": None, "gpus": None}], "conditions": None, "racks": None}
    apiserver.put_object("powercappingpolicies", {**policy("mistral", "batch", cap_w=900), "status": junk_status})
    report = controller_for(client, Clock()).run_round()
    assert sorted(report.written) == ["batch/mistral", "inference/llama"]
    assert stored_status(apiserver)["budgetW"] == 2000


def test_nothing_is_read_or_written_when_nothing_changed(client, apiserver) -> None:
    serve_cluster(apiserver)
    clock = Clock()
    controller = controller_for(client, clock)
    controller.run_round()
    for _ in range(3):
        clock.advance(5)
        agents_catch_up(apiserver, clock.datetime())
        apiserver.clear_requests()
        report = controller.run_round()
        assert report.written == []
        assert not apiserver.requests_to("GET", POLICY_PATH) and not apiserver.requests_to("PUT", STATUS_PATH)
    assert events(apiserver) == []


def printed_columns(obj: dict[str, Any]) -> dict[str, Any]:
    """What ``kubectl get pcp`` prints in the CRD's plain-path printer columns (Cap, Power, GPUs, Ratio)."""
    (version,) = schema.load_crd()["spec"]["versions"]
    columns = {}
    for column in version["additionalPrinterColumns"]:
        if "[" in column["jsonPath"]:
            continue  # filter expressions (Ready): not needed here
        value: Any = obj
        for key in column["jsonPath"].strip(".").split("."):
            value = value.get(key) if isinstance(value, dict) else None
        columns[column["name"]] = value
    return columns


def tokens_reported(apiserver: FakeApiServer, at: datetime, tokens_s_by_gpu: dict[str, float]) -> None:
    """The node agents apply the allocations and publish again ``at``, each GPU with the
    tokens/s given (others: null)."""
    agents_catch_up(apiserver, at)
    for obj in apiserver.objects("nodes"):
        annotations = obj["metadata"]["annotations"]
        old = from_json(annotations[TELEMETRY_ANNOTATION])
        gpus = tuple(replace(g, tokens_s=tokens_s_by_gpu.get(g.uuid)) for g in old.gpus)
        annotations[TELEMETRY_ANNOTATION] = to_json(replace(old, timestamp=at, gpus=gpus))
        apiserver.put_object("nodes", obj)


def test_the_ratio_column_shows_tokens_per_joule_and_settles(client, apiserver) -> None:
    """llama-0 makes 2000 tokens/s on 1380 W and llama-2 300 on 180 W: 2300 / 1560 W = 1.47
    tokens/J in the Ratio column. A 1 % move writes nothing; a 10 % one is written."""
    serve_cluster(apiserver)
    clock = Clock()
    controller = controller_for(client, clock)
    controller.run_round()
    assert printed_columns(apiserver.get_object("powercappingpolicies", "llama", "inference"))["Ratio"] is None
    clock.advance(5)
    tokens_reported(apiserver, clock.datetime(), {"A0": 1000, "A1": 1000, "B0": 150, "B1": 150})
    assert controller.run_round().written == ["inference/llama"]
    stored = apiserver.get_object("powercappingpolicies", "llama", "inference")
    columns = printed_columns(stored)
    assert {name: columns[name] for name in ("Cap", "Power", "GPUs", "Ratio")} == {
        "Cap": 2000, "Power": 1560, "GPUs": 4, "Ratio": 1.47}
    clock.advance(5)
    tokens_reported(apiserver, clock.datetime(), {"A0": 1010, "A1": 1010, "B0": 152, "B1": 152})
    apiserver.clear_requests()
    assert controller.run_round().written == []
    assert not apiserver.requests_to("PUT", STATUS_PATH)
    clock.advance(5)
    tokens_reported(apiserver, clock.datetime(), {"A0": 1100, "A1": 1100, "B0": 165, "B1": 165})
    assert controller.run_round().written == ["inference/llama"]
    assert stored_status(apiserver)["ratio"] == 1.62


def test_each_condition_transition_is_one_event_with_its_own_reason(client, apiserver) -> None:
    serve_cluster(apiserver, cap_w=700)  # 4 GPUs x 200 W minimum > 700 W
    clock = Clock()
    controller = controller_for(client, clock)
    controller.run_round()
    assert sorted(events(apiserver)) == [("Warning", "Infeasible", "llama"), ("Warning", "NotReady", "llama")]
    notes = {e["reason"]: e["note"] for e in apiserver.objects("events", "inference")}
    assert notes["Infeasible"].startswith("Feasible is False: 4 GPUs need at least 800 W (their minimum power limits)")
    assert notes["NotReady"].startswith("Ready is False (Infeasible): 4 GPUs need at least 800 W")
    assert "but the budget is 700 W (the whole powerCapLimit, 700 W)" in notes["Infeasible"]
    assert "raise powerCapLimit to at least 800 W" in notes["Infeasible"]  # the budget is the whole powerCapLimit
    for _ in range(3):  # still infeasible: nothing new
        clock.advance(5)
        agents_catch_up(apiserver, clock.datetime())
        controller.run_round()
    assert len(events(apiserver)) == 2
    fixed = apiserver.get_object("powercappingpolicies", "llama", "inference")
    fixed["spec"]["powerCapLimit"] = 2000
    fixed["metadata"]["generation"] = 2
    apiserver.put_object("powercappingpolicies", fixed)
    clock.advance(5)
    agents_catch_up(apiserver, clock.datetime())
    controller.run_round()
    assert sorted(events(apiserver))[:2] == [("Normal", "BudgetCoversMinimums", "llama"), ("Normal", "Ready", "llama")]
    assert len(events(apiserver)) == 4
    assert stored_status(apiserver)["observedGeneration"] == 2
    event = apiserver.objects("events", "inference")[-1]
    assert event["reportingController"] == "powercapping.example.com/budget-controller"
    assert event["reportingInstance"] == "controller-a"
    assert event["regarding"]["kind"] == "PowerCappingPolicy"


def test_a_new_leader_records_no_event_for_a_condition_that_already_held(client, apiserver) -> None:
    """The agents of gpu-2 never lower their GPUs to 300 W: AgentsLagging from the third
    round. A restarted controller (nothing in memory) and then another replica taking over
    see the condition in the stored status and record nothing, round after round."""
    serve_cluster(apiserver)
    clock = Clock()
    first = controller_for(client, clock, identity="controller-a")
    for _ in range(3):
        first.run_round()
        clock.advance(5)
    assert sorted(events(apiserver)) == [("Warning", "AgentsLagging", "llama"), ("Warning", "NotReady", "llama")]
    note = next(e["note"] for e in apiserver.objects("events", "inference") if e["reason"] == "AgentsLagging")
    assert note.startswith("Enforced is False: 2 GPUs run above their allocation: gpu-2/B0 at 700 W (allocated 300 W)")
    for identity in ("controller-a", "controller-b"):  # a restart, then a takeover
        replica = controller_for(client, clock, identity=identity)
        replica.started_leading(clock.datetime())
        for _ in range(3):
            assert replica.run_round().events == []
            clock.advance(5)
    assert len(events(apiserver)) == 2


def test_lease_acquire_renew_and_lose(client, apiserver) -> None:
    serve_cluster(apiserver)
    clock = Clock()
    a = kube.LeaderElector(client, "powercap-system", "powercap-controller", "controller-a", clock=clock)
    b = kube.LeaderElector(client, "powercap-system", "powercap-controller", "controller-b", clock=clock)
    controller_a = controller_for(client, clock, lambda: a.is_leader, "controller-a")
    controller_b = controller_for(client, clock, lambda: b.is_leader, "controller-b")

    assert controller_a.run_round().written == []  # not leading yet: plans, writes nothing
    assert a.tick()  # acquire
    assert controller_a.run_round().written == ["inference/llama"]
    lease = apiserver.get_object("leases", "powercap-controller", "powercap-system")["spec"]
    assert lease["holderIdentity"] == "controller-a"

    clock.advance(2)
    assert a.tick()  # renew
    renewed = apiserver.get_object("leases", "powercap-controller", "powercap-system")["spec"]
    assert renewed["renewTime"] > lease["renewTime"] and renewed["holderIdentity"] == "controller-a"
    assert not b.tick()  # a holds a fresh Lease

    clock.advance(16)  # a's process hangs: no renewal for longer than the lease
    assert b.tick()
    assert not a.is_leader  # its renew deadline passed, even before it notices b
    changed = apiserver.get_object("powercappingpolicies", "llama", "inference")
    changed["spec"]["powerCapLimit"] = 1500
    apiserver.put_object("powercappingpolicies", changed)
    apiserver.clear_requests()
    assert controller_a.run_round().written == []
    assert not apiserver.requests_to("PUT", STATUS_PATH)
    assert controller_b.run_round().written == ["inference/llama"]
    assert stored_status(apiserver)["budgetW"] == 1500  # the new powerCapLimit, whole
    assert not a.tick()  # sees b's Lease and steps down for good


def test_eviction_answered_429_is_retried_later(client, apiserver) -> None:
    serve_cluster(apiserver, cap_w=8000, algorithm=ENERGY_AWARE, hot=True)
    apiserver.block_evictions()
    uid = apiserver.get_object("pods", "llama-1", "inference")["metadata"]["uid"]
    clock = Clock()
    controller = controller_for(client, clock)

    report = controller.run_round()
    assert report.evictions == [("inference/llama-1", kube.EvictionResult.BLOCKED)]
    assert apiserver.get_object("pods", "llama-1", "inference") is not None
    assert ("Warning", "EvictionBlocked", "llama") in events(apiserver)

    clock.advance(5)
    assert controller.run_round().evictions == []  # within the retry time: not asked again
    apiserver.clear_faults()
    clock.advance(30)
    report = controller.run_round()
    assert report.evictions == [("inference/llama-1", kube.EvictionResult.EVICTED)]
    assert apiserver.get_object("pods", "llama-1", "inference") is None
    on_pod, on_policy = (next(e for e in apiserver.objects("events", "inference")
                              if e["reason"] == "EnergyRebalance" and e["regarding"]["kind"] == kind)
                         for kind in ("Pod", "PowerCappingPolicy"))
    assert on_pod["regarding"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "inference", "name": "llama-1",
                                   "uid": uid}
    assert on_pod["related"]["kind"] == "PowerCappingPolicy" and on_pod["related"]["name"] == "llama"
    assert (on_pod["type"], on_pod["action"], on_pod["reportingController"]) == (
        "Normal", "Descheduled", "powercapping.example.com/budget-controller")
    assert on_pod["note"] == (
        "evicted for policy inference/llama (energy-aware-scheduling): node gpu-1 in rack rack-1 draws 4080 W, "
        "above energyThreshold 3500 W; this pod (1000 W) fits under it on another node, such as gpu-2 "
        "(180 W + 1000 W), where the scheduler can place its replacement"
    )
    assert on_policy["note"].startswith("node gpu-1 draws 4080 W, above energyThreshold 3500 W; evicting inference/llama-1")
    assert on_policy["related"]["name"] == "llama-1"

    clock.advance(5)
    assert controller.run_round().evictions == []  # at most one pod per migrationInterval
    assert len(apiserver.requests_to("POST", "/api/v1/namespaces/inference/pods/llama-1/eviction")) == 2


def test_observe_mode_never_evicts(client, apiserver) -> None:
    serve_cluster(apiserver, cap_w=8000, algorithm=ENERGY_AWARE, hot=True, mode="Observe")
    report = controller_for(client, Clock()).run_round()
    assert report.evictions == []
    assert not [r for r in apiserver.requests if r.path.endswith("/eviction")]
    assert {c["type"]: c["reason"] for c in stored_status(apiserver)["conditions"]}["Enforced"] == "ObserveMode"


def test_a_new_leader_waits_one_interval_before_evicting(client, apiserver) -> None:
    serve_cluster(apiserver, cap_w=8000, algorithm=ENERGY_AWARE, hot=True)
    clock = Clock()
    controller = controller_for(client, clock)
    controller.started_leading(clock.datetime())
    assert controller.run_round().evictions == []
    clock.advance(60)
    agents_catch_up(apiserver, clock.datetime())
    assert controller.run_round().evictions == []
    clock.advance(540)
    agents_catch_up(apiserver, clock.datetime())
    assert [pod for pod, _ in controller.run_round().evictions] == ["inference/llama-1"]


def test_the_loop_elects_watches_writes_and_releases_the_lease(client, apiserver) -> None:
    """The wiring of `powercap controller`: watch caches, a Lease, the loop on its thread."""
    serve_cluster(apiserver)
    snapshots = CacheSnapshots.on(client, ClusterSettings(), AlgorithmRegistry.default())
    controller: BudgetController
    elector = kube.LeaderElector(client, "powercap-system", "powercap-controller", "controller-a",
                                 lease_duration_s=2.0, renew_deadline_s=1.0, retry_period_s=0.05,
                                 on_started_leading=lambda: controller.started_leading(),
                                 on_stopped_leading=lambda: controller.stopped_leading())
    controller = BudgetController(client, snapshots, ControllerSettings(interval_s=0.05, identity="controller-a"),
                                  is_leader=lambda: elector.is_leader)
    stop = threading.Event()
    loop = threading.Thread(target=controller.run, args=(stop,), daemon=True)
    snapshots.start()
    elector.start()
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while not stored_status(apiserver).get("allocations") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stored_status(apiserver)["budgetW"] == 2000
        assert controller.metrics.leader._value.get() == 1  # noqa: SLF001 - the gauge's value
    finally:
        stop.set()
        loop.join(5)
        elector.stop()
        snapshots.stop()
    assert apiserver.get_object("leases", "powercap-controller", "powercap-system")["spec"]["holderIdentity"] == ""


def demand_moves(apiserver: FakeApiServer, clock: Clock) -> None:
    """After a first round (gpu-1's A0 and A1 busy: 700 W each; gpu-2's B0 and B1 idle: 300
    W) and 5 s of agents applying it, the load moves: A idles at 90 W, B runs at its limit.
    The next round lowers A and postpones B's raises until A's lowers are in force."""
    clock.advance(5)
    busy = {"B0", "B1"}
    for updated in agents_apply(apiserver.objects("nodes"), apiserver.objects("powercappingpolicies"), at=clock.datetime(),
                                draw_w=lambda gpu, limit_w: limit_w - 5 if gpu.uuid in busy else 90):
        apiserver.put_object("nodes", updated)


def test_a_round_that_postponed_raises_asks_for_an_early_next_one(
    client, apiserver, caplog: pytest.LogCaptureFixture,
) -> None:
    serve_cluster(apiserver)
    clock = Clock()
    controller = controller_for(client, clock)
    first = controller.run_round()
    assert first.written and not first.follow_up
    demand_moves(apiserver, clock)
    with caplog.at_level("DEBUG", logger="controller"):
        postponing = controller.run_round()
    assert postponing.written == ["inference/llama"] and postponing.follow_up and postponing.plan is not None
    assert postponing.wait_s(controller.settings) == 1.5
    assert {c.uuid: c.bound.value for c in postponing.plan.policies["inference/llama"].allocation.caps} == {
        "A0": "budget", "A1": "budget", "B0": "transition", "B1": "transition"}
    (done,) = [r for r in caplog.records if r.getMessage() == "round done"]
    assert (done.follow_up, done.next_round_in_s) == (True, 1.5)  # type: ignore[attr-defined]
    clock.advance(1.5)
    waiting = controller.run_round()  # A's lowers not reported yet: nothing new to write
    assert (waiting.written, waiting.follow_up) == ([], False)
    agents_catch_up(apiserver, clock.datetime())
    clock.advance(1.5)
    raised = controller.run_round()
    assert raised.written and not raised.follow_up and raised.plan is not None
    assert {c.uuid: c.cap_w for c in raised.plan.policies["inference/llama"].allocation.caps} == {
        "A0": 500, "A1": 500, "B0": 500, "B1": 500}


def test_a_failed_write_asks_for_no_early_round(client, apiserver) -> None:
    """The agents follow only a written status, and a failing API server is not asked more often."""
    serve_cluster(apiserver)
    clock = Clock()
    controller = controller_for(client, clock)
    controller.run_round()
    demand_moves(apiserver, clock)
    apiserver.fail_next(1, 503, method="PUT", path=STATUS_PATH)
    report = controller.run_round()
    assert report.plan is not None and report.plan.follow_up
    assert (report.failed, report.follow_up) == (["inference/llama"], False)


class CountedStop(threading.Event):
    """The stop event of :meth:`BudgetController.run` that records each wait instead of
    sleeping, and is set after ``rounds`` of them."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds = rounds
        self.waits_s: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits_s.append(timeout)
        if len(self.waits_s) >= self.rounds:
            self.set()
        return self.is_set()


@pytest.mark.parametrize(
    ("settings", "waits_s"),
    [
        pytest.param({}, [1.5, 5.0], id="defaults"),
        pytest.param({"follow_up_s": 0.0}, [5.0, 5.0], id="off"),
        pytest.param({"follow_up_s": 3.0}, [3.0, 5.0], id="longer"),
        pytest.param({"follow_up_s": 3.0, "interval_s": 2.0}, [2.0, 2.0], id="never-later-than-the-interval"),
    ],
)
def test_the_loop_runs_the_next_round_sooner_after_one_that_postponed_raises(
    client, apiserver, settings: dict[str, Any], waits_s: list[float],
) -> None:
    """The round that postpones raises waits min(follow_up_s, interval_s); the next one,
    with nothing new to write, the whole interval. (The early round on a queue is off: with
    it on, the loop first waits queue_round_s and then looks for a queue every 0.1 s.)"""
    serve_cluster(apiserver)
    clock = Clock()
    controller = controller_for(client, clock, queue_round_s=0.0, **settings)
    controller.run_round()
    demand_moves(apiserver, clock)
    stop = CountedStop(rounds=2)
    controller.run(stop)
    assert stop.waits_s == pytest.approx(waits_s, abs=0.5)  # less the time each round took


class TimedRounds:
    """Wraps a controller's run_round: the monotonic start of each round; ``stop`` is set
    once ``rounds`` have run."""

    def __init__(self, controller: BudgetController, rounds: int) -> None:
        self.starts_s: list[float] = []
        self.stop = threading.Event()
        run_round = controller.run_round

        def timed() -> Any:
            self.starts_s.append(time.monotonic())
            try:
                return run_round()
            finally:
                if len(self.starts_s) >= rounds:
                    self.stop.set()

        controller.run_round = timed  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("queue_round_s", "queue_after_s", "expected_gap_s"),
    [
        pytest.param(0.3, 0.1, 0.3, id="a queue formed during the wait: the next round queue_round_s after the last ended"),
        pytest.param(0.3, 0.5, 0.5, id="a queue formed later: the next round at once"),
        pytest.param(0.0, 0.1, 2.0, id="off: the whole interval"),
        pytest.param(0.3, None, 2.0, id="no queue: the whole interval"),
    ],
)
def test_a_queue_forming_brings_the_next_round_forward(
    client, apiserver, queue_round_s: float, queue_after_s: float | None, expected_gap_s: float,
) -> None:
    """A PowerCapNode event showing a new queue (TelemetryNodes.on_queue_formed, wired to
    queue_formed) runs the next round queue_round_s after the last one started, or at once
    when that is past, instead of a whole interval later."""
    serve_cluster(apiserver)
    controller = controller_for(client, Clock(), interval_s=2.0, queue_round_s=queue_round_s)
    timed = TimedRounds(controller, rounds=2)
    if queue_after_s is not None:
        threading.Timer(queue_after_s, controller.queue_formed, args=("node-a",)).start()
    loop = threading.Thread(target=controller.run, args=(timed.stop,))
    loop.start()
    loop.join(timeout=10)
    assert not loop.is_alive()
    (first_s, second_s) = timed.starts_s
    assert second_s - first_s == pytest.approx(expected_gap_s, abs=0.15)


def test_a_queue_does_not_bring_forward_a_round_after_failed_writes(client, apiserver) -> None:
    """A failing API server is not asked more often: after a round whose status write
    failed, the next waits the whole interval whatever queues form."""
    serve_cluster(apiserver)
    controller = controller_for(client, Clock(), interval_s=1.0, queue_round_s=0.2)
    apiserver.fail_next(1, 503, method="PUT", path=STATUS_PATH)
    timed = TimedRounds(controller, rounds=2)
    threading.Timer(0.1, controller.queue_formed, args=("node-a",)).start()
    controller.run(timed.stop)
    assert timed.starts_s[1] - timed.starts_s[0] == pytest.approx(1.0, abs=0.15)
    assert controller.metrics.rounds._value.get() == 2  # type: ignore[attr-defined]


def test_a_queue_formed_before_a_round_asks_for_no_second_one(client, apiserver) -> None:
    """The round that starts after a queue formed sees it: the wait after it is the interval."""
    serve_cluster(apiserver)
    controller = controller_for(client, Clock(), interval_s=1.0, queue_round_s=0.2)
    controller.queue_formed("node-a")
    timed = TimedRounds(controller, rounds=3)
    controller.run(timed.stop)
    gaps_s = [b - a for a, b in zip(timed.starts_s, timed.starts_s[1:])]
    assert gaps_s == pytest.approx([1.0, 1.0], abs=0.15)


def test_a_stop_ends_the_wait_for_a_queue_at_once(client, apiserver) -> None:
    serve_cluster(apiserver)
    controller = controller_for(client, Clock(), interval_s=30.0, queue_round_s=0.2)
    stop = threading.Event()
    loop = threading.Thread(target=controller.run, args=(stop,))
    loop.start()
    time.sleep(0.5)  # past queue_round_s: looking for a queue every 0.1 s
    stopped_s = time.monotonic()
    stop.set()
    loop.join(timeout=5)
    assert not loop.is_alive() and time.monotonic() - stopped_s < 0.2


def test_a_negative_follow_up_is_refused() -> None:
    with pytest.raises(ValueError, match="follow_up_s must be at least 0"):
        ControllerSettings(follow_up_s=-1.0)
    with pytest.raises(ValueError, match="queue_round_s must be at least 0"):
        ControllerSettings(queue_round_s=-1.0)


def test_health_endpoints(client, apiserver) -> None:
    class Ready:
        def readiness(self) -> str | None:
            return None

    controller = controller_for(client, Clock())
    server = HttpServer.on("127.0.0.1:0", health_routes(controller, Ready(), controller.metrics))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(f"{base}/healthz").read() == b"ok\n"
        assert urllib.request.urlopen(f"{base}/readyz").status == 200
        assert b"powercap_controller_rounds_total" in urllib.request.urlopen(f"{base}/metrics").read()
        controller.last_round_s = time.time() - 600  # a loop stuck for 10 minutes
        with pytest.raises(urllib.error.HTTPError) as stuck:
            urllib.request.urlopen(f"{base}/healthz")
        assert stuck.value.code == 503
    finally:
        server.stop()


# --- powercap controller --once ---------------------------------------------------------------


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    nodes = [
        node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0", tokens_s=1150),
                                 Gpu("A1", 690, 700, "inference/llama-0", tokens_s=1150)]),
        node("gpu-2", "rack-1", [Gpu("B0", 90, 700, "inference/llama-2"), Gpu("B1", 90, 700, "inference/llama-2")]),
    ]
    pods = [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("llama-2", gpus=2, node="gpu-2", labels=LLAMA)]
    policies = [policy("llama", cap_w=2000, racks=[{"rackId": "rack-1", "maxPower": 5000}], algorithm=ENERGY_AWARE),
                policy("broken", cap_w=2000, algorithm={"name": "nope"})]
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump(kubectl_list(nodes, pods, policies)))
    return path


def test_once_prints_a_table(state_file: Path, capsys) -> None:
    assert main(["controller", "--once", "--cluster-state", str(state_file)]) == 0
    out = capsys.readouterr().out
    assert ("inference/llama  Enforce  cap 2000 W  budget 2000 W  power 1560 W  4 GPUs  ratio 1.67 tokens/J  "
            "(status would change)") in out  # 2300 tokens/s over the 1380 W of the GPUs that report them
    assert "  gpu-2  B0   300    200       90       700      budget" in out  # (2000 - 2 x 700) / 2
    assert "  Ready     True  WithinCap" in out
    assert "  rack rack-1: 1560 W, inlet 24.0 °C" in out
    assert "rebalance: none (no node of the service is above energyThreshold 3500 W)" in out
    assert "warning: policy inference/broken is invalid and ignored: spec.customAlgorithm.name: unknown algorithm" in out


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_once_prints_the_statuses_it_would_write(state_file: Path, output: str, capsys) -> None:
    assert main(["controller", "--once", "--cluster-state", str(state_file), "-o", output]) == 0
    out = capsys.readouterr().out
    document = json.loads(out) if output == "json" else yaml.safe_load(out)
    assert document["kind"] == "List"
    (item,) = document["items"]
    assert item["metadata"] == {"name": "llama", "namespace": "inference"}
    assert [a["watts"] for a in item["status"]["allocations"]] == [1400, 600]  # 2 x 700 W, then 2000 - 1400
    assert item["status"]["ratio"] == 1.67


@pytest.mark.parametrize(
    ("flags", "budget_w", "caps_w"),
    [
        # the whole 1000 W, 500 W each; A0 buys 3 x the tokens per watt: one step (10 % of 200-700 W) moves to
        # it; this round lowers A1, and A0's raise waits until A1's lower is in force (a later round)
        pytest.param([], 1000, (500, 450), id="defaults"),
        pytest.param(["--no-marginal-rebalancing"], 1000, (500, 500), id="no-marginal-rebalancing"),
        pytest.param(["--marginal-rebalancing"], 1000, (500, 450), id="marginal-rebalancing"),
        # floor(1000 x 0.97) = 970, 485 W each; then one 50 W step to A0: A1 at 435 W, A0 keeps the 500 W in force
        pytest.param(["--margin", "0.03"], 970, (500, 435), id="margin"),
        pytest.param(["--margin", "0.03", "--no-marginal-rebalancing"], 970, (485, 485), id="margin-no-rebalancing"),
    ],
)
def test_once_follows_the_margin_and_the_marginal_rebalancing_flags(
    tmp_path: Path, capsys, flags: list[str], budget_w: int, caps_w: tuple[int, int],
) -> None:
    """Two GPUs pinned at their 500 W limits, one serving 1500 tokens/s and the other 500."""
    nodes = [node("gpu-1", "rack-1", [Gpu("A0", 495, 500, "inference/llama-0", tokens_s=1500),
                                      Gpu("A1", 495, 500, "inference/llama-1", tokens_s=500)])]
    pods = [gpu_pod("llama-0", gpus=1, node="gpu-1", labels=LLAMA), gpu_pod("llama-1", gpus=1, node="gpu-1", labels=LLAMA)]
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump(kubectl_list(nodes, pods, [policy("llama", cap_w=1000)])))
    assert main(["controller", "--once", "--cluster-state", str(path), "-o", "json", *flags]) == 0
    (item,) = json.loads(capsys.readouterr().out)["items"]
    assert item["status"]["budgetW"] == budget_w
    (allocation,) = item["status"]["allocations"]
    assert tuple(g["watts"] for g in allocation["gpus"]) == caps_w
    assert sum(caps_w) <= budget_w


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--once", "--cluster-state", "/nonexistent.yaml"], "/nonexistent.yaml: no such file", id="missing file"),
        pytest.param(["--cluster-state", "x.yaml"], "--cluster-state needs --once", id="state file without --once"),
    ],
)
def test_once_usage_errors(argv: list[str], message: str, capsys) -> None:
    assert main(["controller", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_margin_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["controller", "--once", "--margin", "1.5"])
    assert exit_info.value.code == 2
    assert "less than 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("-1", "'-1' must be 0 (off) or at least 0.5 seconds", id="negative"),
        pytest.param("soon", "'soon' is not a number of seconds", id="not-a-number"),
        pytest.param("inf", "'inf' must be 0 (off) or at least 0.5 seconds", id="infinite"),
        pytest.param("0.01", "'0.01' must be 0 (off) or at least 0.5 seconds", id="faster-than-the-agents-tick"),
    ],
)
@pytest.mark.parametrize("flag", ["--transition-follow-up", "--queue-round"])
def test_a_bad_transition_follow_up_is_refused(capsys, flag: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["controller", "--once", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "follow_up_s", "queue_round_s"),
    [
        pytest.param([], 1.5, 1.0, id="default"),
        pytest.param(["--transition-follow-up", "0", "--queue-round", "0"], 0.0, 0.0, id="off"),
        pytest.param(["--transition-follow-up", "2.5", "--queue-round", "0.5"], 2.5, 0.5, id="set"),
    ],
)
def test_the_transition_follow_up_flag_reaches_the_loop(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], follow_up_s: float, queue_round_s: float,
) -> None:
    import controller.cli as cli

    served: list[ControllerSettings] = []
    monkeypatch.setattr(cli.kube.KubeClient, "from_environment", staticmethod(lambda: None))

    def serve(client: Any, cluster: Any, registry: Any, settings: ControllerSettings, args: Any) -> int:
        served.append(settings)
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    assert main(["controller", *argv]) == 0
    assert [(s.follow_up_s, s.queue_round_s) for s in served] == [(follow_up_s, queue_round_s)]


def test_now_is_the_snapshot_time(state_file: Path, capsys) -> None:
    """A snapshot is judged as it was when taken: its telemetry is fresh then."""
    main(["controller", "--once", "--cluster-state", str(state_file), "-o", "json"])
    status = json.loads(capsys.readouterr().out)["items"][0]["status"]
    assert all(c["lastTransitionTime"] == NOW.strftime("%Y-%m-%dT%H:%M:%SZ") for c in status["conditions"])


class LaggingSnapshots:
    """A watch cache that can fall behind: while ``lagging``, each round gets the snapshot the
    last live one was (the statuses from before the controller's own last writes)."""

    def __init__(self, live: ListSnapshots) -> None:
        self.live = live
        self.lagging = False
        self._last: Any = None

    def snapshot(self) -> Any:
        if self.lagging and self._last is not None:
            return self._last
        self._last = self.live.snapshot()
        return self._last


def test_a_round_on_a_cache_behind_its_own_writes_waits_for_the_watch(client, apiserver, caplog) -> None:
    """A follow-up round 1.5 s after a write sees the policy through the watch cache. If that
    still shows the status the write replaced, the round would count GPUs at caps they were
    already moved from: it writes nothing and waits for the watch (or two intervals)."""
    serve_cluster(apiserver)
    clock = Clock()
    snapshots = LaggingSnapshots(ListSnapshots(client, ClusterSettings(), AlgorithmRegistry.default(), clock=clock.datetime))
    controller = BudgetController(client, snapshots, ControllerSettings(identity="controller-a"), clock=clock)  # type: ignore[arg-type]
    assert controller.run_round().written == ["inference/llama"]
    written = stored_status(apiserver)
    snapshots.lagging = True
    demand_moves(apiserver, clock)  # what the cache does not show yet either
    with caplog.at_level("INFO", logger="controller"):
        behind = controller.run_round()
    assert (behind.written, behind.follow_up) == ([], False)
    assert stored_status(apiserver) == written
    assert "waiting for the watch to show the statuses written last round" in caplog.text
    snapshots.lagging = False  # the watch caught up: rounds go on
    assert controller.run_round().written == ["inference/llama"]
