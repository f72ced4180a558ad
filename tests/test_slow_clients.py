"""No single client stops the webhook or the extender: while 200 idle connections and 50
slowloris ones (heads and bodies trickled a byte every half second; for the webhook also
TLS handshakes never completed) are held open on loopback, every normal request is still
answered within a second. The servers are the production ones (``powercap webhook`` and
``powercap extender`` under gunicorn with the buffering worker), with their default
workers and threads; every loop of the load is bounded in count and time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.fakes.objects import extender_args, gpu_node, gpu_pod, kubectl_list, policy, telemetry

from .webhook_helpers import (
    ExtenderProcess,
    WebhookProcess,
    admission_review,
    answered_within,
    slow_clients,
)
from .webhook_helpers import policy as webhook_policy
from .webhook_helpers import webhook_certs  # noqa: F401  (fixture)

REQUESTS = 10
LIMIT_S = 1.0
NODES = [gpu_node("gpu-1", "rack-1", telemetry(4800)), gpu_node("gpu-2", "rack-2", telemetry(1000))]


@pytest.fixture
def fresh_webhook(webhook_certs: Path, tmp_path: Path) -> Iterator[WebhookProcess]:  # noqa: F811
    server = WebhookProcess(webhook_certs, tmp_path / "webhook.log")
    yield server
    server.stop()


@pytest.fixture
def extender(tmp_path: Path) -> Iterator[ExtenderProcess]:
    racks = [{"rackId": "rack-1", "maxPower": 5000}, {"rackId": "rack-2", "maxPower": 5000}]
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(yaml.safe_dump(kubectl_list(NODES, [], [policy("llama", racks=racks)])))
    server = ExtenderProcess(snapshot, tmp_path / "extender.log")
    yield server
    server.stop()


def test_the_webhook_answers_every_request_within_a_second_under_slow_and_idle_connections(fresh_webhook: WebhookProcess) -> None:
    endpoint = fresh_webhook.endpoint
    port = int(endpoint.base_url.rsplit(":", 1)[1])
    review = admission_review("CREATE", webhook_policy())

    def validate_on_a_new_connection() -> None:
        with endpoint.session() as session:
            reply = session.post(f"{endpoint.base_url}/validate", json=review, timeout=LIMIT_S)
            assert reply.status_code == 200 and reply.json()["response"]["allowed"] is True

    with slow_clients(port, tls=True, idle=200, slow=50) as load:
        answered, latencies = answered_within(validate_on_a_new_connection, REQUESTS, LIMIT_S)
        held = load.total - load.closed_by_server
    assert (load.idle, load.handshakes, load.heads, load.bodies, load.not_opened) == (200, 17, 17, 16, 0)
    assert held == 250, "the slow connections must still be open while the requests are answered"
    assert answered == REQUESTS, f"answered {answered} of {REQUESTS} within {LIMIT_S} s: {latencies}"


def test_the_extender_answers_every_call_within_a_second_under_slow_and_idle_connections(extender: ExtenderProcess) -> None:
    body = extender_args(gpu_pod("llama-0", gpus=1, power_watts="700"), NODES, node_cache_capable=True)

    def filter_on_a_new_connection() -> None:
        with requests.Session() as session:
            session.trust_env = False
            reply = session.post(f"{extender.base_url}/filter", data=body, timeout=LIMIT_S)
            assert reply.status_code == 200 and reply.json()["NodeNames"] == ["gpu-2"]

    with slow_clients(extender.port, tls=False, idle=200, slow=50, path="/filter") as load:
        answered, latencies = answered_within(filter_on_a_new_connection, REQUESTS, LIMIT_S)
        held = load.total - load.closed_by_server
    assert (load.idle, load.heads, load.bodies, load.not_opened) == (200, 25, 25, 0)
    assert held == 250
    assert answered == REQUESTS, f"answered {answered} of {REQUESTS} within {LIMIT_S} s: {latencies}"
    assert json.dumps(extender.log_lines())  # the log stays JSON lines
