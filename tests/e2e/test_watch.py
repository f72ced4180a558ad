"""powercap.kube's watch and status-write code against the real API server.

- **410 Gone and the relist.** A :class:`~powercap.kube.WatchCache` (as ServiceAccount
  power-aware-scheduler, the extender's) loses its connection through a TCP proxy; meanwhile
  one policy is deleted, one added, one changed, and etcd's history is compacted. On a
  control plane of its own started with ``--watch-cache=false`` watches are served by etcd,
  so the cache's watch from its old resourceVersion really is refused (with the default
  watch cache, the API server's own window of events keeps that version watchable no matter
  what etcd compacts). The cache must list again and end with exactly the server's objects,
  and its listeners must see the difference.
- **Bookmarks.** kube-apiserver's watch cache sends a BOOKMARK about every minute, and
  2 s before a watch's ``timeoutSeconds`` runs out (none for a timeout of 2 s or less;
  none at all with ``--watch-cache=false``). The test watches with a 5 s timeout, so a
  bookmark comes within about 3 s of each watch rather than within a minute.
- **Conflicts on status writes.** A PUT with a stale resourceVersion gets the real 409,
  which must surface as :class:`~powercap.kube.Conflict` with the fake API server's exact
  Status; :func:`~powercap.kube.update_status` (as the controller's ServiceAccount) reads
  again after a real 409 and keeps the other writer's change, and two writers racing lose
  no update.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from powercap.kube import Conflict, Gone, NotFound, TooManyRequests, KubeClient, WatchCache, error_from_status, policy_path, status_path, update_status
from powercap.objects import object_key
from tests.e2e.harness import (
    NAMESPACE,
    ControlPlane,
    install_bundle,
    start_controlplane,
    stop_controlplane,
    wait_until,
)
from tests.fakes.apiserver import FakeApiServer

GROUP_PLURAL = "powercappingpolicies.powercapping.example.com"
CONTROLLER_SA = "powercap-controller"  # the controller's ServiceAccount (it also watches what the extender watches)


def pcp(namespace: str, name: str, cap_w: int = 1000) -> dict[str, Any]:
    return {"apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"powerCapLimit": cap_w, "selector": {"matchLabels": {"app.kubernetes.io/name": name}}}}


def admin_client(plane: ControlPlane) -> KubeClient:
    return KubeClient.from_environment(kubeconfig=plane.kubeconfig)


def service_account_client(plane: ControlPlane, name: str = CONTROLLER_SA, server: str | None = None) -> KubeClient:
    """A client as ServiceAccount powercap-system/``name`` (a TokenRequest token), to the API
    server or to ``server`` (a proxy in front of it; the serving certificate names 127.0.0.1)."""
    token = plane.kubectl("create", "token", name, "-n", NAMESPACE, "--duration", "1h").stdout.strip()
    return KubeClient.for_server(server or plane.server, token=token, ca_file=plane.env["CA_FILE"])


def etcd_call(plane: ControlPlane, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST to etcd's v3 JSON gateway (``/v3/kv/range``, ``/v3/kv/compaction``)."""
    request = urllib.request.Request(plane.env["ETCD_URL"] + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return dict(json.loads(answer.read()))


def compact_etcd(plane: ControlPlane) -> int:
    """Compact etcd's history up to its current revision (physically); returns the revision."""
    revision = etcd_call(plane, "/v3/kv/range", {"key": "AA=="})["header"]["revision"]  # key "\0": any
    etcd_call(plane, "/v3/kv/compaction", {"revision": revision, "physical": True})
    return int(revision)


class TcpProxy:
    """127.0.0.1:``port`` forwarded to ``target`` byte for byte (TLS passes through).
    :meth:`cut` closes every connection and refuses new ones (accepted, then closed at
    once) until :meth:`resume`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._refusing = False
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # ValueError: cut() closed a socket under select()
            return
        finally:
            for sock in (a, b):
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        with self._lock:
            self._refusing = True
            open_now = list(self._open)
        for sock in open_now:
            self._close(sock)

    def resume(self) -> None:
        with self._lock:
            self._refusing = False

    def stop(self) -> None:
        self._stopped = True
        self.cut()
        self._listener.close()


class Recorder:
    """A WatchCache listener that keeps ``(type, key, resourceVersion)`` of every call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, event_type: str, obj: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((event_type, object_key(obj), obj["metadata"]["resourceVersion"]))

    def take(self) -> list[tuple[str, str, str]]:
        with self._lock:
            taken, self.events = self.events, []
        return taken


def server_state(client: KubeClient, namespace: str) -> dict[str, str]:
    """key -> resourceVersion of the policies in ``namespace``, as the server lists them now."""
    return {object_key(o): o["metadata"]["resourceVersion"] for o in client.list(policy_path(namespace))["items"]}


def cache_state(cache: WatchCache) -> dict[str, str]:
    return {object_key(o): o["metadata"]["resourceVersion"] for o in cache.items()}


def first_event(client: KubeClient, namespace: str, resource_version: str, timeout_s: float = 5) -> tuple[str, dict[str, Any]]:
    """The first event of a watch on the policies of ``namespace``. The first request for a
    custom resource after its CRD is installed gets a 429 "storage is (re)initializing"
    (Retry-After: 1) while the API server's watch cache for it starts: wait as told."""
    deadline = time.monotonic() + 15
    while True:
        try:
            with client.watch(policy_path(namespace), resource_version, timeout_s=timeout_s) as stream:
                return next(stream)
        except TooManyRequests as error:
            if time.monotonic() > deadline:
                raise
            time.sleep(error.retry_after_s or 1)


# -- a control plane whose watches go to etcd


@pytest.fixture(scope="module")
def etcd_watch_plane(tmp_path_factory: pytest.TempPathFactory, cluster: ControlPlane) -> Iterator[ControlPlane]:
    """A second control plane, ``kube-apiserver --watch-cache=false``, with config/'s CRD
    and RBAC, and a namespace ``watch``. (``cluster`` first: it checks the toolchain and
    builds the binaries.)"""
    directory = tmp_path_factory.mktemp("etcd-watch-plane")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(os.environ, "CONTROLPLANE_APISERVER_ARGS", "--watch-cache=false")
        plane = start_controlplane(directory)
    try:
        install_bundle(plane)
        plane.kubectl("create", "namespace", "watch")
        yield plane
    finally:
        stop_controlplane(directory)


def test_a_cache_that_missed_a_compacted_history_relists_and_reports_the_difference(
    etcd_watch_plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    plane, namespace = etcd_watch_plane, "watch"
    admin = admin_client(plane)
    for name in ("a", "b", "c"):
        admin.create(policy_path(namespace), pcp(namespace, name))
    apiserver = plane.server.removeprefix("https://").split(":")
    proxy = TcpProxy((apiserver[0], int(apiserver[1])))
    client = service_account_client(plane, server=proxy.url)
    seen = Recorder()
    cache = WatchCache(client, policy_path(namespace), name="e2e-policies", backoff_initial_s=0.05,
                       backoff_max_s=0.2, listeners=(seen,))
    caplog.set_level(logging.INFO, logger="powercap.kube.watching")
    cache.start()
    try:
        assert cache.wait_synced(10)
        assert sorted(e[:2] for e in seen.take()) == [("ADDED", "watch/a"), ("ADDED", "watch/b"), ("ADDED", "watch/c")]
        a = admin.get(policy_path(namespace, "a"))
        a["spec"]["powerCapLimit"] = 1100
        admin.replace(policy_path(namespace, "a"), a)
        wait_until(lambda: seen.events, 10, "the cache to see a change while connected")
        assert [e[:2] for e in seen.take()] == [("MODIFIED", "watch/a")]
        missed_from, b_rv = cache.resource_version, cache_state(cache)["watch/b"]

        proxy.cut()
        wait_until(lambda: not cache.connected, 10, "the cache to notice it lost the API server")
        admin.request("DELETE", policy_path(namespace, "b"))
        admin.create(policy_path(namespace), pcp(namespace, "d"))
        c = admin.get(policy_path(namespace, "c"))
        c["spec"]["powerCapLimit"] = 1300
        admin.replace(policy_path(namespace, "c"), c)
        compact_etcd(plane)
        # what the cache will get: HTTP 200, then an ERROR event with a 410 Expired Status
        event_type, status = first_event(admin, namespace, missed_from)
        assert event_type == "ERROR", (event_type, status)
        assert status["code"] == 410 and status["reason"] == "Expired", status
        assert isinstance(error_from_status(status), Gone)

        assert seen.events == [] and "watch/b" in cache_state(cache)  # it saw none of it
        proxy.resume()
        expected = server_state(admin, namespace)
        assert set(expected) == {"watch/a", "watch/c", "watch/d"}
        wait_until(lambda: cache_state(cache) == expected, 20, f"the cache to hold exactly {expected}")
        wait_until(lambda: len(seen.events) >= 3, 5, "the listeners to hear of the difference")
        assert sorted(seen.take()) == sorted([
            ("ADDED", "watch/d", expected["watch/d"]), ("DELETED", "watch/b", b_rv),
            ("MODIFIED", "watch/c", expected["watch/c"]),
        ])
        assert cache.last_error == "410 Expired: The resourceVersion for the provided watch is too old.", cache.last_error
        relists = [r for r in caplog.records if "expired, listing again" in r.getMessage()]
        assert len(relists) == 1, [r.getMessage() for r in relists]
        # and it watches again after the relist
        admin.create(policy_path(namespace), pcp(namespace, "e"))
        wait_until(lambda: cache.get("watch/e") is not None, 10, "the cache to see a policy made after the relist")
    finally:
        cache.stop()
        proxy.stop()
        client.close()
        admin.close()


# -- the session's control plane (watch cache on, as in a cluster)


def test_an_expired_watch_is_an_error_event_with_a_410_status_not_an_http_410(
    cluster: ControlPlane, namespace: str
) -> None:
    client = service_account_client(cluster)
    with client:
        event_type, status = first_event(client, namespace, "1")
    assert event_type == "ERROR", (event_type, status)
    assert status["kind"] == "Status" and status["code"] == 410 and status["reason"] == "Expired", status
    assert status["message"].startswith("too old resource version: 1 ("), status
    assert isinstance(error_from_status(status), Gone)


def test_a_bookmark_moves_the_caches_resource_version_without_any_object_change(
    cluster: ControlPlane, namespace: str
) -> None:
    client = service_account_client(cluster)
    admin = admin_client(cluster)
    admin.create(policy_path(namespace), pcp(namespace, "quiet"))
    seen = Recorder()
    cache = WatchCache(client, policy_path(namespace), name="e2e-bookmarks", watch_timeout_s=5, listeners=(seen,))
    cache.start()
    probe = f"bookmark-probe-{namespace}"
    try:
        assert cache.wait_synced(10)
        seen.take()
        version, items = cache.version, cache_state(cache)
        # a change the cache does not watch (another namespace) moves the server's resourceVersion
        elsewhere = admin.create(policy_path(NAMESPACE), pcp(NAMESPACE, probe))
        target_rv = int(elsewhere["metadata"]["resourceVersion"])
        started = time.monotonic()
        wait_until(lambda: int(cache.resource_version) >= target_rv, 20,
                   f"a bookmark to bring the cache to resourceVersion {target_rv}", interval_s=0.05)
        took_s = time.monotonic() - started
        print(f"\nbookmark: the cache reached resourceVersion {cache.resource_version} >= {target_rv} "
              f"{took_s:.1f} s after the write elsewhere (watch timeoutSeconds 5)")
        assert took_s < 10, took_s  # one watch of 5 s bookmarks 2 s before its end; a margin for a loaded machine
        assert cache.version == version and seen.take() == [] and cache_state(cache) == items

        # the bookmark itself: kind, apiVersion and metadata.resourceVersion, nothing else.
        # The API server bookmarks a watch only when the resourceVersion moved past where the
        # watch started (on an idle server a 4 s watch ends empty): a write elsewhere moves it.
        rv = client.list(policy_path(namespace))["metadata"]["resourceVersion"]
        nudge = threading.Timer(0.5, lambda: admin.patch(policy_path(NAMESPACE, probe),
                                                         {"metadata": {"labels": {"nudged": "yes"}}}))
        nudge.start()
        started = time.monotonic()
        try:
            event_type, bookmark = first_event(client, namespace, rv, timeout_s=4)
        except StopIteration:
            raise AssertionError("a watch of 4 s ended without a bookmark") from None
        finally:
            nudge.join()
        after_s = time.monotonic() - started
        assert event_type == "BOOKMARK", (event_type, bookmark)
        assert bookmark == {"apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy",
                            "metadata": {"resourceVersion": bookmark["metadata"]["resourceVersion"]}}, bookmark
        assert after_s <= 4.0, after_s  # before the 4 s timeout (2 s before it, when the server is on time)
    finally:
        cache.stop()
        try:
            admin.request("DELETE", policy_path(NAMESPACE, probe))
        except NotFound:
            pass
        client.close()
        admin.close()


def test_a_stale_resource_version_gets_the_real_409_as_conflict_with_the_fakes_status(
    cluster: ControlPlane, namespace: str
) -> None:
    admin = admin_client(cluster)
    client = service_account_client(cluster)
    with admin, client:
        admin.create(policy_path(namespace), pcp(namespace, "stale"))
        path = policy_path(namespace, "stale")
        read = client.get(path)
        client.replace(status_path(path), {**read, "status": {"gpus": 1}})
        with pytest.raises(Conflict) as real:
            client.replace(status_path(path), {**read, "status": {"gpus": 2}})  # the resourceVersion read before
    with FakeApiServer() as fake:
        fake_client = KubeClient.for_server(fake.url)
        fake_client.create(policy_path(namespace), pcp(namespace, "stale"))
        read = fake_client.get(path)
        fake_client.replace(status_path(path), {**read, "status": {"gpus": 1}})
        with pytest.raises(Conflict) as faked:
            fake_client.replace(status_path(path), {**read, "status": {"gpus": 2}})
        fake_client.close()
    error = real.value
    assert (error.code, error.reason) == (409, "Conflict")
    assert error.message == (f'Operation cannot be fulfilled on {GROUP_PLURAL} "stale": the object has been modified; '
                             "please apply your changes to the latest version and try again")
    assert dict(error.details) == {"name": "stale", "group": "powercapping.example.com", "kind": "powercappingpolicies"}
    assert (faked.value.code, faked.value.reason, faked.value.message, dict(faked.value.details)) == (
        error.code, error.reason, error.message, dict(error.details))


def test_update_status_reads_again_after_a_real_409_and_keeps_the_other_writers_change(
    cluster: ControlPlane, namespace: str
) -> None:
    admin = admin_client(cluster)
    controller = service_account_client(cluster)  # the controller's ServiceAccount: get + update status
    with admin, controller:
        admin.create(policy_path(namespace), pcp(namespace, "raced"))
        path = policy_path(namespace, "raced")
        seen_status: list[dict[str, Any] | None] = []

        def compute(policy: dict[str, Any]) -> dict[str, Any]:
            seen_status.append(policy.get("status"))
            if len(seen_status) == 1:  # another writer gets in between our read and our write
                other = admin.get(path)
                admin.replace(status_path(path), {**other, "status": {**(other.get("status") or {}), "powerW": 123}})
            return {**(policy.get("status") or {}), "gpus": 4}

        stored = update_status(controller, path, compute)
        assert stored is not None
        assert seen_status == [None, {"powerW": 123}]  # the second round read the other writer's status
        assert stored["status"] == {"powerW": 123, "gpus": 4}
        assert admin.get(path)["status"] == {"powerW": 123, "gpus": 4}

        rounds = 0

        def always_raced(policy: dict[str, Any]) -> dict[str, Any]:
            nonlocal rounds
            rounds += 1
            other = admin.get(path)
            admin.replace(status_path(path), {**other, "status": {**other["status"], "powerW": 123 + rounds}})
            return {**policy["status"], "gpus": 5}

        with pytest.raises(Conflict) as conflicted:
            update_status(controller, path, always_raced, attempts=3)
        assert rounds == 3 and conflicted.value.reason == "Conflict"
        assert admin.get(path)["status"] == {"powerW": 126, "gpus": 4}


def test_two_writers_racing_on_a_status_lose_no_update(cluster: ControlPlane, namespace: str) -> None:
    admin = admin_client(cluster)
    writers = [service_account_client(cluster), admin_client(cluster)]
    admin.create(policy_path(namespace), pcp(namespace, "counted"))
    path = policy_path(namespace, "counted")
    per_writer, rounds = 15, [0, 0]
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def write(index: int) -> None:
        def increment(policy: dict[str, Any]) -> dict[str, Any]:
            rounds[index] += 1
            status = policy.get("status") or {}
            return {**status, "gpus": int(status.get("gpus", 0)) + 1}
        try:
            start.wait()
            for _ in range(per_writer):
                update_status(writers[index], path, increment, attempts=50)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not failures, failures
        assert admin.get(path)["status"]["gpus"] == 2 * per_writer
        print(f"\nrace: {2 * per_writer} increments took {sum(rounds)} rounds ({sum(rounds) - 2 * per_writer} real 409s)")
    finally:
        for client in (*writers, admin):
            client.close()
