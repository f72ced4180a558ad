"""The node telemetry annotation: the contract between the node agent and the extender."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from powercap.nodepower import NodePower
from powercap.telemetry import (
    TELEMETRY_ANNOTATION,
    GpuTelemetry,
    NodeTelemetry,
    TelemetryError,
    _parse_gpu,
    _parse_gpu_checked,
    from_json,
    node_telemetry,
    to_json,
)

NOW = datetime(2026, 11, 27, 23, 19, 1, 250000, tzinfo=timezone.utc)
SAMPLE = NodeTelemetry(
    timestamp=NOW,
    power_w=701.25,
    inlet_temperature_c=24.5,
    gpus=(
        GpuTelemetry("GPU-0a1b", 0, 351.25, 400, 200, 700, 61, "inference/llama-0", tokens_s=912.44),
        GpuTelemetry("GPU-2c3d", 1, 350.0, 400, 200, 700, None, None),
    ),
)


def test_written_format_is_the_documented_one() -> None:
    assert json.loads(to_json(SAMPLE)) == {
        "timestamp": "2026-11-27T23:19:01.250Z",
        "powerW": 701.2,
        "inletTemperatureC": 24.5,
        "gpus": [
            {"uuid": "GPU-0a1b", "index": 0, "powerW": 351.2, "limitW": 400, "minW": 200, "maxW": 700,
             "temperatureC": 61, "pod": "inference/llama-0", "tokensPerSecond": 912.4},
            {"uuid": "GPU-2c3d", "index": 1, "powerW": 350, "limitW": 400, "minW": 200, "maxW": 700,
             "temperatureC": None, "pod": None, "tokensPerSecond": None},
        ],
    }


def test_round_trip_and_unknown_keys_ignored() -> None:
    document = json.loads(to_json(SAMPLE))
    document["driverVersion"] = "580.65"
    document["gpus"][0]["eccErrors"] = 0
    parsed = from_json(json.dumps(document))
    assert parsed.timestamp == NOW
    assert parsed.inlet_temperature_c == 24.5
    assert [g.pod for g in parsed.gpus] == ["inference/llama-0", None]
    assert [g.tokens_s for g in parsed.gpus] == [912.4, None]


def test_an_older_agents_annotation_without_tokens_per_second_still_parses() -> None:
    document = json.loads(to_json(SAMPLE))
    for gpu in document["gpus"]:
        del gpu["tokensPerSecond"]
    parsed = from_json(json.dumps(document))
    assert [(g.uuid, g.power_w, g.tokens_s) for g in parsed.gpus] == [("GPU-0a1b", 351.2, None), ("GPU-2c3d", 350.0, None)]


def test_requests_waiting_is_written_only_when_known_and_read_back() -> None:
    queued = replace(SAMPLE, gpus=(replace(SAMPLE.gpus[0], requests_waiting=7), SAMPLE.gpus[1]))
    document = json.loads(to_json(queued))
    assert document["gpus"][0]["requestsWaiting"] == 7
    assert "requestsWaiting" not in document["gpus"][1]  # unknown: absent, as from an older agent
    assert [g.requests_waiting for g in from_json(to_json(queued)).gpus] == [7, None]
    document["gpus"][1]["requestsWaiting"] = None
    assert from_json(json.dumps(document)).gpus[1].requests_waiting is None


def test_a_raised_limit_rides_beside_the_one_the_power_was_read_under() -> None:
    raised = replace(SAMPLE, gpus=(replace(SAMPLE.gpus[0], raised_to_w=468.04), SAMPLE.gpus[1]))
    document = json.loads(to_json(raised))
    assert (document["gpus"][0]["limitW"], document["gpus"][0]["raisedToW"]) == (400, 468)
    assert "raisedToW" not in document["gpus"][1]
    assert [g.raised_to_w for g in from_json(to_json(raised)).gpus] == [468.0, None]


def test_node_power_round_trips_with_its_source_and_age() -> None:
    measured = replace(SAMPLE, node_power=NodePower(4210.04, "redfish", 2.44))
    document = json.loads(to_json(measured))
    assert document["nodePower"] == {"watts": 4210, "source": "redfish", "ageS": 2.4}
    assert document["powerW"] == 701.2  # powerW keeps meaning the GPUs' sum
    assert from_json(to_json(measured)).node_power == NodePower(4210.0, "redfish", 2.4)
    # a reader knowing a newer source keeps its name; an estimate says it is one
    document["nodePower"]["source"] = "pdu-outlet"
    assert from_json(json.dumps(document)).node_power == NodePower(4210, "pdu-outlet", 2.4)
    estimate = from_json(to_json(replace(SAMPLE, node_power=NodePower(2201.25, "estimate", 0))))
    assert estimate.node_power is not None and estimate.node_power.estimated


def test_an_older_agents_annotation_without_node_power_still_parses() -> None:
    assert "nodePower" not in json.loads(to_json(SAMPLE))  # nothing written without a figure
    assert from_json(to_json(SAMPLE)).node_power is None


GPU_WITH = '{"timestamp": "2026-11-27T23:19:01Z", "powerW": 1, "gpus": [{"uuid": "G", "powerW": 1, "limitW": 1, "minW": 1, "maxW": 1, %s}]}'

NODE_POWER = '{"timestamp": "2026-11-27T23:19:01Z", "powerW": 1, "nodePower": %s}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("not json", "not JSON", id="not-json"),
        pytest.param("[]", "must be a JSON object", id="array"),
        pytest.param('{"powerW": 1, "inletTemperatureC": null}', "timestamp must be an RFC 3339 string", id="no-timestamp"),
        pytest.param('{"timestamp": "yesterday", "powerW": 1}', "is not RFC 3339", id="bad-timestamp"),
        pytest.param('{"timestamp": "2026-11-27T23:19:01", "powerW": 1}', "has no time zone", id="naive-timestamp"),
        pytest.param('{"timestamp": "2026-11-27T23:19:01Z"}', "powerW is required", id="no-power"),
        pytest.param('{"timestamp": "2026-11-27T23:19:01Z", "powerW": "700W"}', "powerW must be a finite number", id="power-string"),
        pytest.param('{"timestamp": "2026-11-27T23:19:01Z", "powerW": 1, "gpus": [{"index": 0}]}', "gpus[0].uuid", id="gpu-no-uuid"),
        pytest.param('{"timestamp": "2026-11-27T23:19:01Z", "powerW": 1, "gpus": [{"uuid": "G", "powerW": 1, "limitW": 1, "minW": 1, "maxW": 1, "pod": "nons"}]}', "gpus[0].pod", id="pod-without-namespace"),
        pytest.param('{"timestamp": "2026-11-27T23:19:01Z", "powerW": NaN}', "powerW must be a finite number", id="nan"),
        # JSON bounds no integer; one past a float's range raised OverflowError, which the
        # controller's round did not expect: one node's document stopped every round
        pytest.param('{"timestamp": "2026-11-27T23:19:01Z", "powerW": 1%s}' % ("0" * 400), "powerW must be a finite number", id="huge-integer"),
        pytest.param(GPU_WITH % ('"temperatureC": -1%s' % ("0" * 400)), "gpus[0].temperatureC must be a finite number", id="gpu-huge-integer"),
        pytest.param(GPU_WITH % '"tokensPerSecond": "fast"', "gpus[0].tokensPerSecond must be a finite number", id="tokens-string"),
        pytest.param(GPU_WITH % '"tokensPerSecond": true', "gpus[0].tokensPerSecond must be a finite number", id="tokens-bool"),
        pytest.param(GPU_WITH % '"tokensPerSecond": -3', "gpus[0].tokensPerSecond must not be negative", id="tokens-negative"),
        pytest.param(GPU_WITH % '"tokensPerSecond": Infinity', "gpus[0].tokensPerSecond must be a finite number", id="tokens-infinite"),
        pytest.param(GPU_WITH % '"requestsWaiting": -1', "gpus[0].requestsWaiting must be a non-negative integer", id="waiting-negative"),
        pytest.param(GPU_WITH % '"requestsWaiting": 2.5', "gpus[0].requestsWaiting must be a non-negative integer", id="waiting-fraction"),
        pytest.param(GPU_WITH % '"requestsWaiting": true', "gpus[0].requestsWaiting must be a non-negative integer", id="waiting-bool"),
        pytest.param(GPU_WITH % '"requestsWaiting": "3"', "gpus[0].requestsWaiting must be a non-negative integer", id="waiting-string"),
        pytest.param(GPU_WITH % '"raisedToW": -1', "gpus[0].raisedToW must not be negative", id="raised-negative"),
        pytest.param(GPU_WITH % '"raisedToW": "468"', "gpus[0].raisedToW must be a finite number", id="raised-string"),
        pytest.param(NODE_POWER % '"watts"', "nodePower must be an object", id="node-power-string"),
        pytest.param(NODE_POWER % '{"watts": 4000, "ageS": 1}', "nodePower.source must be a non-empty string", id="node-power-no-source"),
        pytest.param(NODE_POWER % '{"watts": null, "source": "redfish", "ageS": 1}', "nodePower.watts is required", id="node-power-null-watts"),
        pytest.param(NODE_POWER % '{"watts": "4 kW", "source": "redfish", "ageS": 1}', "nodePower.watts must be a finite number", id="node-power-string-watts"),
        pytest.param(NODE_POWER % '{"watts": -1, "source": "redfish", "ageS": 1}', "nodePower.watts must not be negative", id="node-power-negative"),
        pytest.param(NODE_POWER % '{"watts": 4000, "source": "redfish"}', "nodePower.ageS is required", id="node-power-no-age"),
        pytest.param(NODE_POWER % '{"watts": 4000, "source": "redfish", "ageS": -3}', "nodePower.ageS must not be negative", id="node-power-negative-age"),
    ],
)
def test_malformed_annotations_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(TelemetryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_json(text)


def test_node_telemetry_from_node_object_and_freshness() -> None:
    node = {"metadata": {"name": "n1", "annotations": {TELEMETRY_ANNOTATION: to_json(SAMPLE)}}}
    telemetry = node_telemetry(node)
    assert telemetry is not None
    assert telemetry.is_fresh(NOW + timedelta(seconds=90))
    assert not telemetry.is_fresh(NOW + timedelta(seconds=91))
    assert node_telemetry({"metadata": {"name": "n2"}}) is None


def test_offsets_and_fractions_are_accepted() -> None:
    document = json.loads(to_json(SAMPLE))
    document["timestamp"] = "2026-11-28T00:19:01.250000+01:00"
    assert from_json(json.dumps(document)).timestamp == NOW


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("2026-11-27T23:19:01.25Z", id="two-digits"),
        pytest.param("2026-11-27T23:19:01.250000000Z", id="nanoseconds-as-go-writes-them"),
        pytest.param("2026-11-27T23:19:01.2500+00:00", id="four-digits-with-offset"),
    ],
)
def test_any_fraction_of_a_second_is_read(text: str) -> None:
    from powercap.telemetry import parse_timestamp

    assert parse_timestamp(text) == NOW


_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-300, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(10**307, 10**320), st.integers(-(10**320), -(10**307)),
    st.sampled_from(["", "GPU-0", "ns/pod", "pod", "400"]), st.just([]), st.just({}),
)
_GPU_KEYS = ("uuid", "index", "pod", "powerW", "limitW", "minW", "maxW", "temperatureC", "tokensPerSecond",
             "requestsWaiting", "raisedToW")
_WELL_FORMED = {"uuid": "GPU-0", "index": 0, "powerW": 350.5, "limitW": 400, "minW": 200, "maxW": 700,
                "temperatureC": 61, "pod": "inference/chat-0", "tokensPerSecond": 1200.5, "requestsWaiting": 3,
                "raisedToW": 420}


@settings(max_examples=600, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(_GPU_KEYS), _FIELD_VALUES, max_size=4),
       dropped=st.sets(st.sampled_from(_GPU_KEYS), max_size=3), position=st.integers(0, 7))
def test_a_gpu_entry_reads_the_same_on_the_fast_path_and_the_checked_one(
    changes: dict[str, object], dropped: set[str], position: int,
) -> None:
    """The controller reads every well-formed entry in one check; whatever an agent (or
    anyone with patch rights) writes, it gets what the field-by-field parse gives: the same
    GpuTelemetry, or the same error naming the field."""
    raw = {key: value for key, value in {**_WELL_FORMED, **changes}.items() if key not in dropped}

    def outcome(parse: object) -> object:
        try:
            return parse(raw, position)  # type: ignore[operator]
        except TelemetryError as error:
            return f"error: {error}"

    assert outcome(_parse_gpu) == outcome(_parse_gpu_checked)
