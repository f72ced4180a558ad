"""Scenario files: the built-in one, and every problem of a bad one reported with its path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from powercap.simulation.scenario import (
    CapChange,
    Scale,
    ScenarioError,
    default_scenario_text,
    load_scenario,
    scenario_from_document,
)


def default_document() -> dict[str, Any]:
    return yaml.safe_load(default_scenario_text())


def test_the_built_in_scenario_is_heterogeneous_and_fits_the_issue() -> None:
    scenario = load_scenario(default_scenario_text())
    assert scenario.gpu_count == 64
    assert {group.gpu.name for group in scenario.nodes} == {"H200-like", "L40S-like"}
    assert 2 <= len(scenario.racks) <= 3
    assert len(scenario.services) >= 2
    assert len({s.prefill_share for s in scenario.services}) == len(scenario.services)
    assert len({s.daily_shape for s in scenario.services}) == len(scenario.services)
    assert all(r.max_power_w and r.max_temperature_c for r in scenario.racks)
    policies = [doc["spec"] for doc in scenario.policies]
    assert all(spec.get("rackConstraints") for spec in policies)
    assert any(spec.get("customAlgorithm", {}).get("name") == "energy-aware-scheduling" for spec in policies)
    assert any(isinstance(e, CapChange) for e in scenario.events)


def test_overrides_compress_the_day_into_the_new_duration_and_change_the_seed() -> None:
    scenario = load_scenario(default_scenario_text()).with_overrides(duration_s=120, seed=9)
    assert (scenario.duration_s, scenario.workload.day_length_s, scenario.seed) == (120, 120, 9)


def mutate(change: Any) -> dict[str, Any]:
    document = default_document()
    change(document)
    return document


def set_path(path: list[Any], value: Any) -> Any:
    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def delete_path(path: list[Any]) -> Any:
    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return change


@pytest.mark.parametrize(
    "change, path, message",
    [
        pytest.param(set_path(["racks", 1, "maxPower"], 0), "racks[1].maxPower", "must be greater than 0", id="rack power zero"),
        pytest.param(set_path(["racks", 0, "maxTemperature"], 70), "racks[0].maxTemperature", "must be at most 60", id="inlet above 60"),
        pytest.param(set_path(["racks", 0, "maxpower"], 1), "racks[0].maxpower", "did you mean maxPower", id="typo names the field"),
        pytest.param(delete_path(["services"]), "services", "is required", id="no services"),
        pytest.param(set_path(["nodes", 2, "rack"], "rack-9"), "nodes[2].rack", 'unknown rack "rack-9"', id="unknown rack"),
        pytest.param(set_path(["nodes", 0, "gpuModel"], "B200"), "nodes[0].gpuModel", 'unknown GPU model "B200"', id="unknown GPU"),
        pytest.param(set_path(["nodes", 0, "minLimitW"], 800), "nodes[0].gpuModel", "defaultLimitW: must be in [minLimitW, maxLimitW]", id="limits inconsistent"),
        pytest.param(set_path(["nodes", 1, "name"], "h200-a"), "nodes[1].name", 'node "h200-a-0" is also defined by nodes[0]', id="duplicate node"),
        pytest.param(set_path(["policies", 0, "spec", "powerCapLimit"], 0), "policies[0].spec.powerCapLimit", "must be greater than 0",
                     id="policy checked by the webhook's validator"),
        pytest.param(set_path(["policies", 2, "spec", "customAlgorithm", "parameters", "energyTreshold"], 1),
                     "policies[2].spec.customAlgorithm.parameters.energyTreshold", "unknown parameter", id="algorithm parameters"),
        pytest.param(set_path(["services", 0, "policy"], "nope"), "services[0].policy", 'no valid policy "inference/nope"', id="unknown policy"),
        pytest.param(set_path(["services", 0, "labels"], {"powercapping.example.com/policy": "code"}), "services[0].policy",
                     "does not match the pod labels", id="selector does not match"),
        pytest.param(set_path(["services", 1, "dailyShape"], "weekend"), "services[1].dailyShape", 'unknown shape "weekend"', id="unknown shape"),
        pytest.param(set_path(["services", 1, "dailyShape"], [0.5] * 23), "services[1].dailyShape", "24 hourly factors", id="short shape"),
        pytest.param(set_path(["services", 1, "gpuModels"], ["L40S-like", "A100"]), "services[1].gpuModels[1]", 'unknown GPU model "A100"',
                     id="unknown GPU model in a selector"),
        pytest.param(set_path(["services", 2, "name"], "chat"), "services[2].name", 'duplicate name "chat"', id="duplicate service"),
        pytest.param(set_path(["stepS"], 0.3), "stepS", "must divide 1 s", id="step does not divide a second"),
        pytest.param(set_path(["events", 0, "atS"], 600), "events[0].atS", "must be before durationS", id="event after the end"),
        pytest.param(set_path(["events", 0, "policy"], "inference/none"), "events[0].policy", 'unknown policy "inference/none"', id="event policy"),
        pytest.param(set_path(["events"], [{"atS": 5, "service": "chat"}]), "events[0].replicas", "is required with service", id="half a scale event"),
        pytest.param(set_path(["events"], [{"atS": 5, "service": "chat", "replicas": 2, "powerCapLimit": 9}]), "events[0]",
                     "either policy and powerCapLimit, or service and replicas", id="mixed event"),
        pytest.param(set_path(["workload", "bursts"], [{"service": "video", "atS": 1, "durationS": 2, "factor": 2}]),
                     "workload.bursts[0].service", 'unknown service "video"', id="burst service"),
        pytest.param(set_path(["workload", "bursts"], [{"service": "chat", "atS": 600, "durationS": 2, "factor": 2}]),
                     "workload.bursts[0].atS", "must be before durationS (600 s)", id="burst after the end"),
        pytest.param(set_path(["workload", "randomBursts"], {"count": 2, "minFactor": 2, "maxFactor": 1}),
                     "workload.randomBursts.minFactor", "must not exceed maxFactor", id="burst range"),
        pytest.param(set_path(["scheduler"], {"gpuScoring": "Random"}), "scheduler.gpuScoring", "must be one of", id="scoring"),
    ],
)
def test_a_bad_scenario_names_the_field(change: Any, path: str, message: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        scenario_from_document(mutate(change))
    shown = [str(p) for p in raised.value.problems]
    assert any(p.path == path and message in p.message for p in raised.value.problems), shown


def test_every_problem_is_reported_at_once() -> None:
    document = default_document()
    document["nodes"][0]["rack"] = "rack-x"
    document["services"][0]["policy"] = "missing"
    document["events"][0]["atS"] = 10_000
    with pytest.raises(ScenarioError) as raised:
        scenario_from_document(document)
    assert {p.path for p in raised.value.problems} == {"nodes[0].rack", "services[0].policy", "events[0].atS"}


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("racks: [\n", "invalid YAML at line", id="broken YAML"),
        pytest.param("- 1\n- 2\n", "a scenario must be an object, not a list", id="not an object"),
        pytest.param(default_scenario_text().replace("powerCapLimit: 4800}", "powerCapLimit: 18446744073709551616}"),
                     r"events\[0\].powerCapLimit: 18446744073709551616 is outside the int64 range", id="event cap past int64"),
        pytest.param(default_scenario_text().replace("warmupS: ", "warmupS: 1%s #" % ("0" * 400), 1),
                     r"timing.warmupS: 1000.* is too large", id="400-digit number"),
        pytest.param(default_scenario_text().replace("dailyShape: chat", "dailyShape: [1%s%s]" % ("0" * 400, ", 0.5" * 23), 1),
                     "hourly factors must be numbers in", id="400-digit hourly factor"),
    ],
)
def test_unreadable_scenarios(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        load_scenario(text)


def test_scale_events_and_defaults_are_typed() -> None:
    document = default_document()
    document["events"] = [{"atS": 30, "service": "code", "replicas": 4}]
    del document["timing"]
    scenario = scenario_from_document(copy.deepcopy(document))
    assert scenario.events == (Scale(30.0, "code", 4),)
    assert scenario.timing.agent_interval_s == 1 and scenario.timing.controller_interval_s == 5


def test_the_scale_scenario_is_10000_gpus_in_over_100_racks_and_valid() -> None:
    """benchmarks/scenarios/scale-10k.yaml (issue 14, scale) loads as any scenario does and is the size it says."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scenarios" / "scale-10k.yaml"
    scenario = load_scenario(path.read_text(encoding="utf-8"))
    assert scenario.gpu_count == 10_000
    assert sum(group.count for group in scenario.nodes) == 1_250
    assert len(scenario.racks) >= 100
    assert len(scenario.services) >= 3
    assert scenario.duration_s == 3600
    assert sum(service.replicas * service.gpus_per_pod for service in scenario.services) <= scenario.gpu_count
