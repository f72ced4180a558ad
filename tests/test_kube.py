"""powercap.kube against the fake API server, over real sockets (no mocks of our code)."""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.fakes.apiserver import FakeApiServer

from powercap import kube
from powercap.objects import object_key
from powercap.kube import (
    ApiError,
    Conflict,
    EvictionResult,
    Gone,
    KubeClient,
    LeaderElector,
    NotFound,
    TooManyRequests,
    Unreachable,
    WatchCache,
)

MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
NS = "ml"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def client(apiserver: FakeApiServer) -> Iterator[KubeClient]:
    with KubeClient.for_server(apiserver.url, read_timeout_s=5.0) as c:
        yield c


CacheFactory = Callable[..., WatchCache]


@pytest.fixture
def start_cache(client: KubeClient) -> Iterator[CacheFactory]:
    """Start WatchCaches with test-sized backoff; all are stopped at teardown."""
    started: list[WatchCache] = []

    def start(
        path: str,
        params: dict[str, Any] | None = None,
        listeners: tuple[kube.WatchListener, ...] = (),
        **options: Any,
    ) -> WatchCache:
        settings = {"backoff_initial_s": 0.02, "backoff_max_s": 0.1, "rng": random.Random(0), **options}
        cache = WatchCache(client, path, params, listeners=listeners, **settings)
        cache.start()
        started.append(cache)
        return cache

    yield start
    for cache in started:
        cache.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def pod(name: str, node: str = "n1", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "vllm", "image": "vllm"}]},
    }


def policy(name: str = "llama", cap_w: int = 4000) -> dict[str, Any]:
    return {
        "apiVersion": "powercapping.example.com/v1alpha1",
        "kind": "PowerCappingPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"powerCapLimit": cap_w},
    }


def stored(server: FakeApiServer, resource: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    obj = server.get_object(resource, name, namespace)
    assert obj is not None, f"{resource} {namespace}/{name} is not stored"
    return obj


def lease_spec(server: FakeApiServer) -> dict[str, Any]:
    spec: dict[str, Any] = stored(server, "leases", "budget-controller", "powercap-system")["spec"]
    return spec


def keys(cache: WatchCache) -> set[str]:
    return {object_key(o) for o in cache.items()}


class FakeClock:
    """Epoch seconds that move only when told."""

    def __init__(self, now_s: float = 1_795_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


# --------------------------------------------------------------------------- WatchCache


def test_cache_lists_then_applies_watch_events(apiserver: FakeApiServer, start_cache: CacheFactory) -> None:
    for name, node in (("a", "n1"), ("b", "n1"), ("c", "n2")):
        apiserver.put_object("pods", pod(name, node))
    seen: list[tuple[str, str]] = []
    cache = start_cache(
        kube.pod_path(),
        {"fieldSelector": "spec.nodeName=n1"},
        listeners=(
            lambda kind, obj: seen.append((kind, object_key(obj))),
            lambda kind, obj: 1 / 0,  # a broken listener must not stop the cache
        ),
    )

    assert cache.wait_synced(5)
    assert keys(cache) == {"ml/a", "ml/b"}
    assert seen == [("ADDED", "ml/a"), ("ADDED", "ml/b")]  # the initial list, like an informer
    seen.clear()
    version = cache.version

    apiserver.put_object("pods", pod("a", "n1", tier="gold"))
    apiserver.put_object("pods", pod("d", "n1"))
    apiserver.delete_object("pods", "b", NS)
    apiserver.put_object("pods", pod("a", "n2"))  # leaves the selector: seen as DELETED

    assert wait_until(lambda: keys(cache) == {"ml/d"})
    assert seen == [("MODIFIED", "ml/a"), ("ADDED", "ml/d"), ("DELETED", "ml/b"), ("DELETED", "ml/a")]
    assert cache.version == version + 4
    d = cache.get("ml/d")
    assert d is not None and d["spec"]["nodeName"] == "n1"
    assert cache.get("ml/a") is None
    assert cache.resource_version == str(apiserver.resource_version)
    assert len(apiserver.requests_to("GET", kube.pod_path(), watch=False)) == 1


@pytest.mark.parametrize("expired_as", ["event", "http"], ids=["error-event-410", "http-410"])
def test_cache_relists_on_gone_and_reports_what_it_missed(
    apiserver: FakeApiServer, start_cache: CacheFactory, expired_as: str
) -> None:
    apiserver.expired_as = expired_as  # type: ignore[assignment]
    apiserver.put_object("pods", pod("a"))
    apiserver.put_object("pods", pod("b"))
    seen: list[tuple[str, str]] = []
    cache = start_cache(kube.pod_path(NS), listeners=(lambda kind, obj: seen.append((kind, object_key(obj))),))
    assert cache.wait_synced(5)
    seen.clear()

    # Keep the cache off the stream while the world changes and history is compacted.
    apiserver.fail_next(10_000, 503, watch=True)
    apiserver.close_watches()
    assert wait_until(lambda: len(apiserver.requests_to("GET", kube.pod_path(NS), watch=True)) >= 2)
    apiserver.delete_object("pods", "b", NS)
    apiserver.put_object("pods", pod("c"))
    apiserver.compact()
    apiserver.clear_faults()

    assert wait_until(lambda: keys(cache) == {"ml/a", "ml/c"})
    # listeners run just after the items are swapped in
    assert wait_until(lambda: sorted(seen) == [("ADDED", "ml/c"), ("DELETED", "ml/b")]), seen
    assert len(apiserver.requests_to("GET", kube.pod_path(NS), watch=False)) == 2
    apiserver.put_object("pods", pod("d"))  # and it watches again after the relist
    assert wait_until(lambda: "ml/d" in keys(cache))


def test_cache_relists_when_its_open_watch_expires(apiserver: FakeApiServer, start_cache: CacheFactory) -> None:
    cache = start_cache(kube.pod_path())
    assert cache.wait_synced(5) and apiserver.wait_for_watches(1)
    apiserver.compact()  # the open watch gets {"type":"ERROR","object":{..."code":410}}
    assert wait_until(lambda: len(apiserver.requests_to("GET", kube.pod_path(), watch=False)) == 2)
    apiserver.put_object("pods", pod("late"))
    assert wait_until(lambda: keys(cache) == {"ml/late"})


def test_cache_backs_off_exponentially_then_recovers(apiserver: FakeApiServer, start_cache: CacheFactory) -> None:
    apiserver.put_object("pods", pod("a"))
    apiserver.fail_next(3, 500, watch=False)
    cache = start_cache(kube.pod_path(), backoff_initial_s=0.05, backoff_max_s=1.0)

    assert cache.wait_synced(5)
    assert keys(cache) == {"ml/a"}
    lists = apiserver.requests_to("GET", kube.pod_path(), watch=False)
    assert len(lists) == 4
    gaps_s = [later.time_s - earlier.time_s for earlier, later in zip(lists, lists[1:])]
    assert gaps_s[0] >= 0.025  # jitter keeps at least half of the 0.05 s step
    assert gaps_s[2] > gaps_s[0]  # 0.1-0.2 s after the third failure vs 0.025-0.05 s


def test_cache_says_when_it_lost_the_api_server(apiserver: FakeApiServer, start_cache: CacheFactory) -> None:
    """Consumers (the webhook's cross-policy checks) must know the copy may be stale."""
    cache = start_cache(kube.pod_path(), backoff_initial_s=0.05, backoff_max_s=0.2)
    assert cache.wait_synced(5) and apiserver.wait_for_watches(1)
    assert cache.connected and cache.last_error == ""
    apiserver.fail_next(10_000, 503, watch=True)
    apiserver.close_watches()
    assert wait_until(lambda: not cache.connected)
    assert "503" in cache.last_error
    assert cache.has_synced, "the last copy stays readable"
    apiserver.clear_faults()
    assert wait_until(lambda: cache.connected)


def test_cache_survives_a_dropped_connection(apiserver: FakeApiServer, start_cache: CacheFactory) -> None:
    cache = start_cache(kube.pod_path())
    assert cache.wait_synced(5) and apiserver.wait_for_watches(1)
    apiserver.drop_next(1, watch=True)  # the reconnect is dropped too
    apiserver.close_watches(abrupt=True)  # cut mid-stream

    assert wait_until(lambda: len(apiserver.requests_to("GET", kube.pod_path(), watch=True)) >= 3)
    apiserver.put_object("pods", pod("after-drop"))
    assert wait_until(lambda: keys(cache) == {"ml/after-drop"})
    assert len(apiserver.requests_to("GET", kube.pod_path(), watch=False)) == 1  # resumed, no relist


def test_cache_stop_is_prompt_while_watching_and_while_backing_off(
    apiserver: FakeApiServer, start_cache: CacheFactory
) -> None:
    watching = start_cache(kube.pod_path())
    assert watching.wait_synced(5) and apiserver.wait_for_watches(1)
    apiserver.fail_next(10_000, 500, path=kube.node_path())
    backing_off = start_cache(kube.node_path(), backoff_initial_s=30.0, backoff_max_s=30.0)
    assert wait_until(lambda: len(apiserver.requests_to("GET", kube.node_path())) >= 1)

    for cache in (watching, backing_off):
        started = time.monotonic()
        cache.stop()
        assert time.monotonic() - started < 1.0
    assert not any(t.name.startswith("watch-cache:") for t in threading.enumerate())
    assert wait_until(lambda: apiserver.active_watches == 0)
    assert not backing_off.has_synced


def test_watch_stream_yields_bookmarks_and_error_events(apiserver: FakeApiServer, client: KubeClient) -> None:
    apiserver.put_object("pods", pod("a"))
    listed = client.list(kube.pod_path())
    with client.watch(kube.pod_path(), kube.resource_version(listed), timeout_s=10) as stream:
        assert apiserver.wait_for_watches(1)
        apiserver.send_bookmark()
        kind, obj = next(stream)
        assert (kind, kube.resource_version(obj)) == ("BOOKMARK", kube.resource_version(listed))

        apiserver.compact()
        kind, status = next(stream)
        assert kind == "ERROR" and status["reason"] == "Expired"
        assert isinstance(kube.error_from_status(status), Gone)
        assert next(stream, None) is None


def test_cache_pauses_when_the_server_ends_every_watch_at_once(
    apiserver: FakeApiServer, start_cache: CacheFactory
) -> None:
    """A proxy that closes long requests at once must not turn the cache into a tight loop."""
    cache = start_cache(kube.pod_path(), backoff_initial_s=0.1, backoff_max_s=0.2)
    assert cache.wait_synced(5) and apiserver.wait_for_watches(1)
    apiserver.end_next_watches(10_000, path=kube.pod_path())
    apiserver.close_watches()
    time.sleep(0.6)
    watches = len(apiserver.requests_to("GET", kube.pod_path(), watch=True))
    assert 2 <= watches <= 8, f"{watches} watch requests in 0.6 s"
    assert cache.connected, "the server answers: the copy is current"
    apiserver.clear_faults()
    apiserver.put_object("pods", pod("later"))
    assert wait_until(lambda: keys(cache) == {"ml/later"})
    assert len(apiserver.requests_to("GET", kube.pod_path(), watch=False)) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_cache_waits_as_long_as_retry_after_says(
    apiserver: FakeApiServer, start_cache: CacheFactory, status: int
) -> None:
    apiserver.put_object("pods", pod("a"))
    apiserver.fail_next(1, status, watch=False, retry_after_s=1)
    cache = start_cache(kube.pod_path(), backoff_initial_s=0.01, backoff_max_s=0.02)
    assert wait_until(lambda: len(apiserver.requests_to("GET", kube.pod_path())) >= 1)
    time.sleep(0.5)
    assert len(apiserver.requests_to("GET", kube.pod_path())) == 1, "asked again before Retry-After"
    assert cache.wait_synced(5) and keys(cache) == {"ml/a"}


@pytest.mark.parametrize(
    ("status", "watch", "says"),
    [
        pytest.param(
            403, False,
            'pods is forbidden: User "system:serviceaccount:powercap-system:powercap" cannot list resource "pods" '
            'in API group "" at the cluster scope (missing RBAC permission: list pods in API group "" at the cluster scope)',
            id="403-list",
        ),
        pytest.param(
            403, True, 'missing RBAC permission: watch pods in API group "" in namespace "ml"', id="403-watch",
        ),
        pytest.param(
            401, False,
            "401 Unauthorized: Unauthorized (the API server did not accept our credentials to list pods in API group "
            '"" in namespace "ml": the service account token is missing, expired or revoked)',
            id="401-list",
        ),
    ],
)
def test_cache_says_which_permission_is_missing(
    apiserver: FakeApiServer, start_cache: CacheFactory, caplog: pytest.LogCaptureFixture,
    status: int, watch: bool, says: str,
) -> None:
    path = kube.pod_path() if status == 403 and not watch else kube.pod_path(NS)
    apiserver.fail_next(10_000, status, watch=watch)
    with caplog.at_level("WARNING", logger="powercap.kube"):
        cache = start_cache(path, backoff_initial_s=0.05, backoff_max_s=0.1)
        assert wait_until(lambda: any(says in r.getMessage() for r in caplog.records))
    record = next(r for r in caplog.records if says in r.getMessage())
    assert record.levelname == "ERROR"
    assert (record.verb, record.resource, record.code) == ("watch" if watch else "list", "pods", status)  # type: ignore[attr-defined]
    assert says in cache.last_error
    assert len(apiserver.requests_to("GET", path, watch=watch)) < 20, "backs off, no tight loop"


@pytest.mark.parametrize("watch", [False, True], ids=["list-hangs", "watch-hangs"])
def test_cache_gives_up_on_a_request_the_server_never_answers(apiserver: FakeApiServer, watch: bool) -> None:
    apiserver.put_object("pods", pod("a"))
    apiserver.hang_next(1, path=kube.pod_path(), watch=watch)
    with KubeClient.for_server(apiserver.url, read_timeout_s=0.3) as impatient:
        cache = WatchCache(impatient, kube.pod_path(), backoff_initial_s=0.02, backoff_max_s=0.05)
        cache.start()
        try:
            assert cache.wait_synced(5) and keys(cache) == {"ml/a"}
            # a wedged watch is abandoned after the read timeout, not after the 300 s watch timeout
            assert wait_until(lambda: len(apiserver.requests_to("GET", kube.pod_path(), watch=watch)) >= 2)
            apiserver.put_object("pods", pod("b"))
            assert wait_until(lambda: keys(cache) == {"ml/a", "ml/b"})
        finally:
            cache.stop()
            apiserver.clear_faults()


def test_cache_resumes_after_a_stream_cut_mid_line_without_losing_or_repeating(
    apiserver: FakeApiServer, start_cache: CacheFactory
) -> None:
    seen: list[tuple[str, str]] = []
    cache = start_cache(kube.pod_path(), listeners=(lambda kind, obj: seen.append((kind, object_key(obj))),))
    assert cache.wait_synced(5) and apiserver.wait_for_watches(1)
    apiserver.put_object("pods", pod("a"))
    assert wait_until(lambda: keys(cache) == {"ml/a"})
    apiserver.close_watches(mid_line=True)  # ends with half an event line
    apiserver.put_object("pods", pod("b"))
    apiserver.put_object("pods", pod("a", tier="gold"))
    assert wait_until(lambda: len(seen) == 3)
    assert seen == [("ADDED", "ml/a"), ("ADDED", "ml/b"), ("MODIFIED", "ml/a")]
    assert len(apiserver.requests_to("GET", kube.pod_path(), watch=False)) == 1  # resumed, no relist


# --------------------------------------------------------------------------- leader election


def elector(client: KubeClient, identity: str, clock: FakeClock, calls: list[str] | None = None) -> LeaderElector:
    calls = calls if calls is not None else []
    return LeaderElector(
        client,
        "powercap-system",
        "budget-controller",
        identity,
        clock=clock,
        on_started_leading=lambda: calls.append(f"{identity} started"),
        on_stopped_leading=lambda: calls.append(f"{identity} stopped"),
    )


LEASE = kube.lease_path("powercap-system", "budget-controller")


def test_leader_creates_the_lease_then_renews_it(client: KubeClient, apiserver: FakeApiServer) -> None:
    clock, calls = FakeClock(), list[str]()
    a = elector(client, "a", clock, calls)

    assert a.tick() and a.is_leader
    spec = lease_spec(apiserver)
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0 and MICRO_TIME.match(spec["renewTime"])
    assert kube.parse_time(spec["renewTime"]) == pytest.approx(clock())

    clock.advance(2)
    assert a.tick()
    renewed = lease_spec(apiserver)
    assert kube.parse_time(renewed["renewTime"]) == pytest.approx(clock())
    assert renewed["acquireTime"] == spec["acquireTime"] and renewed["leaseTransitions"] == 0
    assert calls == ["a started"]


def test_other_identity_cannot_take_a_fresh_lease(client: KubeClient, apiserver: FakeApiServer) -> None:
    clock = FakeClock()
    a, b = elector(client, "a", clock), elector(client, "b", clock)
    assert a.tick()
    clock.advance(14)  # renewed 14 s ago: still valid for a 15 s lease
    assert not b.tick() and not b.is_leader
    assert b.holder == "a"
    assert lease_spec(apiserver)["holderIdentity"] == "a"


def test_expired_lease_is_taken_over_and_the_old_leader_steps_down(client: KubeClient, apiserver: FakeApiServer) -> None:
    clock, calls = FakeClock(), list[str]()
    a, b = elector(client, "a", clock, calls), elector(client, "b", clock, calls)
    assert a.tick()
    clock.advance(1)
    assert not b.tick()  # b sees a's record and starts timing it by its own clock

    clock.advance(15)  # a stopped renewing 16 s ago
    assert b.tick() and b.is_leader
    spec = lease_spec(apiserver)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert kube.parse_time(spec["acquireTime"]) == pytest.approx(clock())

    assert not a.tick() and not a.is_leader
    assert calls == ["a started", "b started", "a stopped"]


def test_leader_steps_down_when_renewals_fail_past_the_deadline(client: KubeClient, apiserver: FakeApiServer) -> None:
    clock, calls = FakeClock(), list[str]()
    a = elector(client, "a", clock, calls)
    assert a.tick()
    apiserver.fail_next(10_000, 500, path=LEASE)

    clock.advance(5)
    assert a.tick()  # renewal failed, but within the 10 s renew deadline
    clock.advance(5)
    assert not a.is_leader  # the deadline holds even before the next round
    assert not a.tick()
    assert calls == ["a started", "a stopped"]


def test_a_lost_race_is_not_fatal(client: KubeClient, apiserver: FakeApiServer) -> None:
    clock, calls = FakeClock(), list[str]()
    a = elector(client, "a", clock, calls)
    assert a.tick()
    apiserver.conflict_next_put(LEASE)
    clock.advance(2)
    assert a.tick()  # 409 on renew: still leader within the deadline
    clock.advance(2)
    assert a.tick()
    assert calls == ["a started"]
    assert len(apiserver.requests_to("PUT", LEASE)) == 2


@pytest.mark.parametrize("holder_skew_s", [3600.0, -3600.0], ids=["holder-clock-ahead", "holder-clock-behind"])
def test_lease_expiry_is_judged_by_our_own_clock(client: KubeClient, apiserver: FakeApiServer, holder_skew_s: float) -> None:
    """renewTime is written by the holder's clock: a holder an hour ahead must not keep a
    dead Lease for an hour, and one an hour behind must not lose a live Lease."""
    ours = FakeClock()
    theirs = FakeClock(ours() + holder_skew_s)
    a, b = elector(client, "a", theirs), elector(client, "b", ours)
    assert a.tick()
    for _ in range(10):  # a renews every 2 s: b never takes over, whatever renewTime says
        ours.advance(2)
        theirs.advance(2)
        assert a.tick() and not b.tick()
    ours.advance(14)  # a stopped renewing 14 s ago
    assert not b.tick()
    ours.advance(2)
    assert b.tick() and lease_spec(apiserver)["holderIdentity"] == "b"


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"holderIdentity": "x", "leaseDurationSeconds": "fifteen", "renewTime": None}, id="wrong-types"),
        pytest.param("garbage", id="spec-not-an-object"),
    ],
)
def test_an_odd_lease_never_ends_the_elector(client: KubeClient, apiserver: FakeApiServer, spec: Any) -> None:
    apiserver.put_object("leases", {"metadata": {"name": "budget-controller", "namespace": "powercap-system"}, "spec": spec})
    clock = FakeClock()
    a = elector(client, "a", clock)
    assert a.tick() is False or a.is_leader  # no exception
    apiserver.delete_object("leases", "budget-controller", "powercap-system")
    clock.advance(2)
    assert a.tick() and lease_spec(apiserver)["holderIdentity"] == "a"


def test_a_forbidden_lease_says_which_permission_is_missing(
    client: KubeClient, apiserver: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = elector(client, "a", FakeClock())
    apiserver.fail_next(1, 403, method="POST")
    with caplog.at_level("WARNING", logger="powercap.kube"):
        assert not a.tick()
    (record,) = [r for r in caplog.records if "acquire/renew failed" in r.getMessage()]
    assert record.levelname == "ERROR"
    assert 'missing RBAC permission: create leases in API group "coordination.k8s.io" in namespace "powercap-system"' in (
        record.getMessage())


def test_elector_thread_leads_and_releases_the_lease_on_stop(client: KubeClient, apiserver: FakeApiServer) -> None:
    calls: list[str] = []
    a = LeaderElector(
        client, "powercap-system", "budget-controller", "a",
        lease_duration_s=2.0, renew_deadline_s=1.0, retry_period_s=0.05,
        on_started_leading=lambda: calls.append("started"),
        on_stopped_leading=lambda: calls.append("stopped"),
    )
    a.start()
    assert wait_until(lambda: a.is_leader)
    started = time.monotonic()
    a.stop()
    assert time.monotonic() - started < 1.0
    assert not a.is_leader and calls == ["started", "stopped"]
    spec = lease_spec(apiserver)
    assert spec["holderIdentity"] == ""
    b = elector(client, "b", FakeClock(time.time()))
    assert b.tick()  # a released lease is free at once


# --------------------------------------------------------------------------- write helpers


def test_update_status_retries_a_conflict(client: KubeClient, apiserver: FakeApiServer) -> None:
    apiserver.put_object("powercappingpolicies", policy())
    path = kube.policy_path(NS, "llama")
    apiserver.conflict_next_put(kube.status_path(path))
    seen_versions: list[str] = []

    def compute(obj: dict[str, Any]) -> dict[str, Any]:
        seen_versions.append(kube.resource_version(obj))
        return {"observedGeneration": obj["metadata"]["generation"], "budgetW": 3800}

    updated = kube.update_status(client, path, compute)

    assert updated is not None and updated["status"] == {"observedGeneration": 1, "budgetW": 3800}
    after = stored(apiserver, "powercappingpolicies", "llama", NS)
    assert after["status"]["budgetW"] == 3800 and after["spec"] == {"powerCapLimit": 4000}
    assert after["metadata"]["generation"] == 1
    assert len(seen_versions) == 2
    assert len(apiserver.requests_to("PUT", kube.status_path(path))) == 2


def test_update_status_gives_up_after_the_last_attempt(client: KubeClient, apiserver: FakeApiServer) -> None:
    apiserver.put_object("powercappingpolicies", policy())
    path = kube.policy_path(NS, "llama")
    apiserver.conflict_next_put(kube.status_path(path), count=3)
    with pytest.raises(Conflict):
        kube.update_status(client, path, lambda obj: {"budgetW": 1}, attempts=3)


@pytest.mark.parametrize(
    "compute",
    [
        pytest.param(lambda obj: dict(obj["status"]), id="same-status"),
        pytest.param(lambda obj: None, id="nothing-to-say"),
    ],
)
def test_update_status_skips_a_no_op_write(
    client: KubeClient, apiserver: FakeApiServer, compute: Callable[[dict[str, Any]], Any]
) -> None:
    apiserver.put_object("powercappingpolicies", {**policy(), "status": {"budgetW": 3800}})
    path = kube.policy_path(NS, "llama")
    assert kube.update_status(client, path, compute) is None
    assert apiserver.requests_to("PUT") == []


@pytest.mark.parametrize(
    ("setup", "expected", "pod_remains"),
    [
        pytest.param(lambda s: s.put_object("pods", pod("p")), EvictionResult.EVICTED, False, id="201-evicted"),
        pytest.param(
            lambda s: (s.put_object("pods", pod("p")), s.block_evictions("ml/p")),
            EvictionResult.BLOCKED, True, id="429-pdb-blocks",
        ),
        pytest.param(lambda s: None, EvictionResult.GONE, False, id="404-gone"),
    ],
)
def test_evict_pod(
    client: KubeClient, apiserver: FakeApiServer, setup: Callable[[FakeApiServer], Any],
    expected: EvictionResult, pod_remains: bool,
) -> None:
    setup(apiserver)
    assert kube.evict_pod(client, NS, "p") is expected
    assert (apiserver.get_object("pods", "p", NS) is not None) is pod_remains
    (request,) = apiserver.requests_to("POST", kube.eviction_path(NS, "p"))
    assert request.body["apiVersion"] == "policy/v1" and request.body["kind"] == "Eviction"


def test_patch_node_annotations_merges(client: KubeClient, apiserver: FakeApiServer) -> None:
    apiserver.put_object("nodes", {"metadata": {"name": "n1", "annotations": {"keep": "1", "drop": "2"}}})
    node = kube.patch_node_annotations(client, "n1", {"drop": None, "powercapping.example.com/telemetry": "{}"})
    expected = {"keep": "1", "powercapping.example.com/telemetry": "{}"}
    assert node["metadata"]["annotations"] == expected
    assert stored(apiserver, "nodes", "n1")["metadata"]["annotations"] == expected
    (request,) = apiserver.requests_to("PATCH", kube.node_path("n1"))
    assert request.content_type == "application/merge-patch+json"


def test_post_event_records_an_events_k8s_io_event(client: KubeClient, apiserver: FakeApiServer) -> None:
    regarding = apiserver.put_object("powercappingpolicies", policy())
    assert kube.post_event(
        client, regarding, "CapLowered", "x" * 2000, "Warning",
        action="SetPowerLimit", reporting_controller="powercapping.example.com/nodeagent",
        reporting_instance="nodeagent-n1", clock=lambda: 1_795_000_000.25,
    )
    (event,) = apiserver.objects("events", NS)
    assert re.fullmatch(r"llama\.[0-9a-f]{16}", event["metadata"]["name"])  # client-go's <name>.<hex ns>
    assert event["eventTime"] == "2026-11-18T11:06:40.250000Z"
    assert event["regarding"] == {
        "apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy", "namespace": NS,
        "name": "llama", "uid": regarding["metadata"]["uid"],
        "resourceVersion": regarding["metadata"]["resourceVersion"],
    }
    assert (event["type"], event["reason"], event["action"]) == ("Warning", "CapLowered", "SetPowerLimit")
    assert event["reportingController"] == "powercapping.example.com/nodeagent"
    assert event["reportingInstance"] == "nodeagent-n1"
    assert len(event["note"]) == 1024  # cut to the API's limit instead of being refused


def test_post_event_names_a_related_object(client: KubeClient, apiserver: FakeApiServer) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "namespace": NS, "name": "llama-1", "uid": "u-1"}
    regarding = apiserver.put_object("powercappingpolicies", policy())
    assert kube.post_event(client, pod, "EnergyRebalance", "evicted", related=regarding, action="Descheduled",
                           reporting_controller="pc", reporting_instance="i")
    (event,) = apiserver.objects("events", NS)
    assert event["regarding"] == pod
    assert (event["related"]["kind"], event["related"]["name"]) == ("PowerCappingPolicy", "llama")


def test_post_event_on_a_node_goes_to_default_and_never_raises(client: KubeClient, apiserver: FakeApiServer) -> None:
    node = apiserver.put_object("nodes", {"metadata": {"name": "n1"}})
    common: dict[str, Any] = {"action": "Throttle", "reporting_controller": "pc", "reporting_instance": "i"}
    assert kube.post_event(client, node, "RackHot", "inlet 41 C", **common)
    assert [e["regarding"]["name"] for e in apiserver.objects("events", "default")] == ["n1"]
    apiserver.fail_next(1, 503)
    assert kube.post_event(client, node, "RackHot", "inlet 42 C", **common) is False


# --------------------------------------------------------------------------- client and errors


def _stale_replace(server: FakeApiServer, client: KubeClient) -> Any:
    server.put_object("pods", pod("p"))
    stale = client.get(kube.pod_path(NS, "p"))
    server.put_object("pods", pod("p", tier="gold"))
    return client.replace(kube.pod_path(NS, "p"), stale)


def _refused(server: FakeApiServer, client: KubeClient) -> Any:
    server.stop()
    return client.get(kube.node_path())


def _injected(status: int) -> Callable[[FakeApiServer, KubeClient], Any]:
    def call(server: FakeApiServer, client: KubeClient) -> Any:
        server.fail_next(1, status)
        return client.get(kube.node_path())

    return call


def _dropped(server: FakeApiServer, client: KubeClient) -> Any:
    server.drop_next(1)
    return client.get(kube.node_path())


@pytest.mark.parametrize(
    ("call", "error", "code", "reason"),
    [
        pytest.param(lambda s, c: c.get(kube.pod_path(NS, "nope")), NotFound, 404, "NotFound", id="404"),
        pytest.param(
            lambda s, c: [c.create(kube.pod_path(NS), pod("p")) for _ in range(2)],
            Conflict, 409, "AlreadyExists", id="409-already-exists",
        ),
        pytest.param(_stale_replace, Conflict, 409, "Conflict", id="409-stale-resource-version"),
        pytest.param(_injected(410), Gone, 410, "Expired", id="410"),
        pytest.param(_injected(429), TooManyRequests, 429, "TooManyRequests", id="429"),
        pytest.param(_injected(500), ApiError, 500, "InternalError", id="500"),
        pytest.param(_refused, Unreachable, 0, "Unreachable", id="connection-refused"),
        pytest.param(_dropped, Unreachable, 0, "Unreachable", id="connection-dropped"),
    ],
)
def test_errors_map_to_our_hierarchy(
    apiserver: FakeApiServer, client: KubeClient, call: Callable[[FakeApiServer, KubeClient], Any],
    error: type[ApiError], code: int, reason: str,
) -> None:
    with pytest.raises(ApiError) as caught:
        call(apiserver, client)
    assert type(caught.value) is error
    assert (caught.value.code, caught.value.reason) == (code, reason)
    if isinstance(caught.value, TooManyRequests):
        assert caught.value.retry_after_s == 1.0


def test_conflict_message_is_the_api_servers(apiserver: FakeApiServer, client: KubeClient) -> None:
    with pytest.raises(Conflict) as caught:
        _stale_replace(apiserver, client)
    assert caught.value.message == (
        'Operation cannot be fulfilled on pods "p": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert caught.value.details == {"name": "p", "kind": "pods"}


def test_list_follows_continue_tokens_and_types_items(apiserver: FakeApiServer, client: KubeClient) -> None:
    for i in range(5):
        apiserver.put_object("pods", pod(f"p{i}", tier="gold" if i % 2 else "silver"))
    listed = client.list(kube.pod_path(NS), {"limit": 2, "labelSelector": "tier in (gold,silver)"})
    assert [p["metadata"]["name"] for p in listed["items"]] == [f"p{i}" for i in range(5)]
    assert {(p["kind"], p["apiVersion"]) for p in listed["items"]} == {("Pod", "v1")}
    assert "continue" not in listed["metadata"]
    assert len(apiserver.requests_to("GET", kube.pod_path(NS))) == 3
    gold = client.list(kube.pod_path(NS), {"labelSelector": "tier=gold"})
    assert [p["metadata"]["name"] for p in gold["items"]] == ["p1", "p3"]


def test_patch_types(apiserver: FakeApiServer, client: KubeClient) -> None:
    apiserver.put_object("powercappingpolicies", policy())
    path = kube.policy_path(NS, "llama")
    patched = client.patch(path, [{"op": "replace", "path": "/spec/powerCapLimit", "value": 3000}], patch_type="json")
    assert patched["spec"]["powerCapLimit"] == 3000 and patched["metadata"]["generation"] == 2
    with pytest.raises(ApiError) as caught:  # as on a real server: no strategic merge for CRs
        client.patch(path, {"spec": {"powerCapLimit": 1}}, patch_type="strategic")
    assert caught.value.code == 415


def test_from_environment_reads_the_kubeconfig(
    apiserver: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{apiserver.url}'}}}}]\n"
        "users: [{name: me, user: {token: s3cret}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: me}}]\n"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with KubeClient.from_environment() as client:
        assert client.host == apiserver.url
        client.list(kube.node_path())
    (request,) = apiserver.requests_to("GET", kube.node_path())
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["user-agent"].startswith("powercap/")

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(kube.KubeConfigError):
        KubeClient.from_environment()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("garbage: [\n", "is not valid YAML: while parsing a flow node", id="not-yaml"),
        pytest.param("clusters: 5\n", "is not a kubeconfig ('int' object is not iterable)", id="clusters-not-a-list"),
        pytest.param("- a\n- b\n", "is not a kubeconfig", id="a-list"),
    ],
)
def test_a_broken_kubeconfig_is_one_error_that_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, message: str,
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(content)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(kube.KubeConfigError) as raised:
        KubeClient.from_environment()
    assert f"{kubeconfig} {message}" in str(raised.value)
    assert raised.value.__cause__ is None and "\n" not in str(raised.value)


def test_time_helpers_round_trip() -> None:
    stamp = kube.format_micro_time(1_795_000_000.123456)
    assert stamp == "2026-11-18T11:06:40.123456Z"
    assert kube.parse_time(stamp) == pytest.approx(1_795_000_000.123456)
    assert kube.parse_time("2026-11-18T11:06:40Z") == 1_795_000_000.0
    assert kube.parse_time("2026-11-18T11:06:40.5+00:00") == 1_795_000_000.5


def test_paths() -> None:
    assert kube.pod_path() == "/api/v1/pods"
    assert kube.pod_path(NS, "p") == "/api/v1/namespaces/ml/pods/p"
    assert kube.eviction_path(NS, "p") == "/api/v1/namespaces/ml/pods/p/eviction"
    assert kube.node_path("n1") == "/api/v1/nodes/n1"
    assert kube.event_path(NS) == "/apis/events.k8s.io/v1/namespaces/ml/events"
    assert kube.lease_path("s", "l") == "/apis/coordination.k8s.io/v1/namespaces/s/leases/l"
    assert kube.status_path(kube.policy_path(NS, "x")) == (
        "/apis/powercapping.example.com/v1alpha1/namespaces/ml/powercappingpolicies/x/status"
    )
    with pytest.raises(ValueError):
        kube.pod_path(name="p")
