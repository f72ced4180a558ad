"""The results of a simulation as one JSON-ready document (``summary.json``).

Figures per strategy (definitions in :mod:`powercap.simulation.metrics`), per service and
per rack, plus powercap's tokens/s against the static equal split at the same caps.
"""

from __future__ import annotations

import math
from typing import Any

from powercap.simulation.engine import SimulationResult, StrategyRun
from powercap.simulation.metrics import (
    cap_violation_seconds,
    excluded_seconds,
    limit_violation_seconds,
    ratio,
    recovery_time_s,
    rounded,
    weighted_percentile,
)
from powercap.simulation.scenario import Scenario

LATENCY_PERCENTILE = 0.99


def summarize(result: SimulationResult) -> dict[str, Any]:
    """summary.json: the scenario, every strategy's figures, and the comparisons."""
    scenario = result.scenario
    strategies = {run.strategy.name: summarize_run(scenario, run) for run in result.runs}
    document: dict[str, Any] = {
        "scenario": {
            "name": scenario.name,
            "durationS": scenario.duration_s,
            "stepS": scenario.step_s,
            "seed": scenario.seed,
            "gpus": scenario.gpu_count,
            "nodes": sum(group.count for group in scenario.nodes),
            "racks": [rack.rack_id for rack in scenario.racks],
            "services": [service.name for service in scenario.services],
            "traces": {
                service.name: {
                    "file": service.trace.file,
                    "format": service.trace.format,
                    "startS": service.trace.start_s,
                    "speedup": service.trace.speedup,
                    "scale": service.trace.scale,
                    "traceSeconds": service.trace.recorded.duration_s,
                    "traceTokens": service.trace.recorded.total_tokens,
                }
                for service in scenario.services
                if service.trace is not None
            },
            "bursts": [
                {"service": b.service, "atS": b.at_s, "durationS": b.duration_s, "factor": b.factor}
                for b in result.trace.bursts
            ],
        },
        "strategies": strategies,
        "comparison": compare(strategies),
    }
    return rounded(document)


def summarize_run(scenario: Scenario, run: StrategyRun) -> dict[str, Any]:
    recorder = run.recorder
    duration_s = scenario.duration_s
    changes_s = [at_s for at_s, _, _ in run.cap_changes]
    skip = excluded_seconds(recorder.seconds, scenario.timing.warmup_s, changes_s, scenario.timing.settle_s)
    services: dict[str, Any] = {}
    capped_seconds = capped_after = violations = violations_after = 0
    tokens_total = offered_total = dropped_total = 0.0
    for index, name in enumerate(recorder.services):
        power_w = recorder.service_energy_j[index]
        caps = recorder.service_cap_w[index]
        over = cap_violation_seconds(power_w, caps)
        over_after = cap_violation_seconds(power_w, caps, skip)
        with_cap = sum(1 for cap in caps if cap is not None)
        with_cap_after = sum(1 for s, cap in enumerate(caps) if cap is not None and s not in skip)
        capped_seconds += with_cap
        capped_after += with_cap_after
        violations += len(over)
        violations_after += len(over_after)
        tokens = math.fsum(recorder.service_tokens[index])
        offered = math.fsum(recorder.service_offered_tokens[index])
        dropped = math.fsum(recorder.service_dropped_tokens[index])
        energy_j = math.fsum(power_w)
        tokens_total += tokens
        offered_total += offered
        dropped_total += dropped
        services[name] = {
            "tokensPerSecond": tokens / duration_s,
            "offeredTokensPerSecond": offered / duration_s,
            "droppedPercent": 100.0 * dropped / offered if offered > 0 else 0.0,
            "energyJ": energy_j,
            "tokensPerJoule": ratio(tokens, energy_j),
            "peakPowerW": max(power_w, default=0.0),
            "capViolationSeconds": len(over),
            "capViolationSecondsAfterConvergence": len(over_after),
            "firstCapViolations": over[:10],
            # the caps set on its GPUs (a pod's GPUs from binding on) summed above powerCapLimit
            "capsSumAboveCapSeconds": sum(
                1 for cap, caps_sum in zip(caps, recorder.service_caps_sum_w[index]) if cap is not None and caps_sum > cap + 1e-6
            ),
            "p99LatencyProxyS": weighted_percentile(recorder.service_latency[index], LATENCY_PERCENTILE),
        }
    racks: dict[str, Any] = {}
    power_violations = temperature_violations = 0
    for index, rack_id in enumerate(recorder.racks):
        rack = scenario.rack(rack_id)
        power_w = recorder.rack_energy_j[index]
        inlet_c = recorder.rack_inlet_c(index)
        over_power = limit_violation_seconds(power_w, rack.max_power_w)
        over_temperature = limit_violation_seconds(inlet_c, rack.max_temperature_c)
        power_violations += len(over_power)
        temperature_violations += len(over_temperature)
        racks[rack_id] = {
            "maxPowerW": rack.max_power_w,
            "peakPowerW": max(power_w, default=0.0),
            "powerViolationSeconds": len(over_power),
            "maxTemperatureC": rack.max_temperature_c,
            "peakInletC": max(inlet_c, default=0.0),
            "temperatureViolationSeconds": len(over_temperature),
        }
    cap_changes = []
    for at_s, policy_key, cap_w in run.cap_changes:
        service_index = _service_of_policy(scenario, policy_key)
        recovery = None
        if service_index is not None:
            recovery = recovery_time_s(recorder.service_step_power_w[service_index], recorder.step_s, at_s, cap_w)
        cap_changes.append({"atS": at_s, "policy": policy_key, "powerCapLimitW": cap_w, "recoveryS": recovery})
    energy_j = recorder.total_energy_j()
    return {
        "description": run.strategy.description,
        "tokensPerSecond": tokens_total / duration_s,
        "offeredTokensPerSecond": offered_total / duration_s,
        "droppedPercent": 100.0 * dropped_total / offered_total if offered_total > 0 else 0.0,
        "energyJ": energy_j,
        "energyKWh": energy_j / 3.6e6,
        "averagePowerW": energy_j / duration_s,
        "tokensPerJoule": ratio(tokens_total, energy_j),
        "capViolationSeconds": violations,
        "capViolationSecondsAfterConvergence": violations_after,
        "withinCapPercent": _percent_within(violations, capped_seconds),
        "withinCapPercentAfterConvergence": _percent_within(violations_after, capped_after),
        "rackPowerViolationSeconds": power_violations,
        "rackTemperatureViolationSeconds": temperature_violations,
        "worstP99LatencyProxyS": max((s["p99LatencyProxyS"] or 0.0 for s in services.values()), default=0.0),
        "capChanges": cap_changes,
        "evictions": [{"atS": at_s, "pod": pod, "node": node} for at_s, pod, node in run.evictions],
        "unschedulablePods": len(run.unschedulable),
        "unschedulable": dict(sorted(run.unschedulable.items())[:10]),
        "wallSeconds": run.wall_s,
        "speedVsRealTime": duration_s / run.wall_s if run.wall_s > 0 else None,
        "services": services,
        "racks": racks,
    }


def _percent_within(violations: int, seconds: int) -> float | None:
    return 100.0 * (seconds - violations) / seconds if seconds else None


def _service_of_policy(scenario: Scenario, policy_key: str) -> int | None:
    for index, service in enumerate(scenario.services):
        if service.policy_name is not None and f"{service.namespace}/{service.policy_name}" == policy_key:
            return index
    return None


def compare(strategies: dict[str, Any]) -> dict[str, Any]:
    """Relative figures: powercap against the static split and against no capping, in percent."""
    comparison: dict[str, Any] = {}
    powercap, static, uncapped = (strategies.get(name) for name in ("powercap", "static-split", "no-capping"))
    if powercap and static:
        comparison["powercapVsStaticTokensPercent"] = _change(powercap["tokensPerSecond"], static["tokensPerSecond"])
        comparison["powercapVsStaticTokensPerJoulePercent"] = _change(powercap["tokensPerJoule"], static["tokensPerJoule"])
        comparison["powercapVsStaticTokensPercentByService"] = {
            name: _change(service["tokensPerSecond"], static["services"][name]["tokensPerSecond"])
            for name, service in powercap["services"].items()
        }
    if static and uncapped:
        # What the caps cost the equal split: every GPU at its maximum is the most tokens any
        # split of the same caps could serve (unless uncapped GPUs overheat into slowdown).
        comparison["noCappingVsStaticTokensPercent"] = _change(uncapped["tokensPerSecond"], static["tokensPerSecond"])
    if powercap and uncapped:
        comparison["powercapVsNoCappingEnergyPercent"] = _change(powercap["energyJ"], uncapped["energyJ"])
        comparison["powercapVsNoCappingTokensPercent"] = _change(powercap["tokensPerSecond"], uncapped["tokensPerSecond"])
    return comparison


def _change(new: float | None, old: float | None) -> float | None:
    if new is None or not old:
        return None
    return 100.0 * (new / old - 1.0)
