"""The results of a simulation as documents: ``summary.json``, the results table, ``report.html``.

Figures per strategy (definitions in :mod:`powercap.simulation.metrics`), per service and
per rack, plus powercap's tokens/s against the static equal split at the same caps. The
table and the page are rendered from the summary alone (pure: the caller writes them).
"""

from __future__ import annotations

import base64
import math
from html import escape
from typing import Any

from powercap.simulation.engine import SimulationResult, StrategyRun
from powercap.simulation.metrics import (
    LATENCY_PERCENTILE,
    cap_violation_seconds,
    excluded_seconds,
    limit_violation_seconds,
    ratio,
    recovery_time_s,
    rounded,
)
from powercap.simulation.scenario import Scenario


def summarize(result: SimulationResult) -> dict[str, Any]:
    """summary.json: the scenario, every strategy's figures, and the comparisons."""
    scenario = result.scenario
    strategies = {run.strategy.name: summarize_run(scenario, run) for run in result.runs}
    document: dict[str, Any] = {
        "scenario": {
            "name": scenario.name,
            "description": scenario.description,
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
                    "peakUtilisation": service.trace.peak_utilisation,
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
    converged = recorder.seconds > len(skip)  # a run no longer than the warm-up has no such figure
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
            "capViolationSecondsAfterConvergence": len(over_after) if converged else None,
            "firstCapViolations": over[:10],
            # the caps set on its GPUs (a pod's GPUs from binding on) summed above powerCapLimit
            "capsSumAboveCapSeconds": sum(
                1 for cap, caps_sum in zip(caps, recorder.service_caps_sum_w[index]) if cap is not None and caps_sum > cap + 1e-6
            ),
            "p99LatencyProxyS": recorder.latency_percentile_s(index, LATENCY_PERCENTILE),
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
        "nonGpuEnergyJ": math.fsum(recorder.non_gpu_energy_j),
        "averagePowerW": energy_j / duration_s,
        "tokensPerJoule": ratio(tokens_total, energy_j),
        "capViolationSeconds": violations,
        "capViolationSecondsAfterConvergence": violations_after if converged else None,
        "secondsAfterConvergence": recorder.seconds - len(skip),
        "withinCapPercent": _percent_within(violations, capped_seconds),
        "withinCapPercentAfterConvergence": _percent_within(violations_after, capped_after) if converged else None,
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


# -- the results as a person reads them: the table (stdout) and report.html ----------------

NOT_AVAILABLE = "n/a"


def results_table(summary: dict[str, Any]) -> list[list[str]]:
    """The results table: a header, a second header line, then a row per strategy. A figure
    over an empty window (after convergence in a run no longer than the warm-up) is "n/a"."""
    services = list(summary["scenario"]["services"])
    header = ["strategy", "tokens/s", "tokens/J", "kWh", "cap viol. s", "within cap", "rack W viol. s",
              "rack °C viol. s", "p99 latency s", "dropped"]
    rows = [header, ["", "", "", "", "(converged)", "", "", "", "/".join(services), ""]]
    for name, figures in summary["strategies"].items():
        latencies = "/".join(_fmt(figures["services"][s]["p99LatencyProxyS"], 1) for s in services)
        after = figures["capViolationSecondsAfterConvergence"]
        rows.append([
            name,
            f"{figures['tokensPerSecond']:,.0f}",
            _fmt(figures["tokensPerJoule"], 2),
            _fmt(figures["energyKWh"], 2),
            f"{figures['capViolationSeconds']} ({NOT_AVAILABLE if after is None else after})",
            _percent(figures["withinCapPercent"]),
            str(figures["rackPowerViolationSeconds"]),
            str(figures["rackTemperatureViolationSeconds"]),
            latencies,
            f"{figures['droppedPercent']:.1f} %",
        ])
    return rows


def comparison_lines(summary: dict[str, Any]) -> list[str]:
    """The headline comparisons and each cap change's recovery, a sentence a line."""
    lines = []
    comparison = summary["comparison"]
    if "powercapVsStaticTokensPercent" in comparison:
        by_service = ", ".join(
            f"{name} {_signed(value)}" for name, value in comparison["powercapVsStaticTokensPercentByService"].items()
        )
        lines.append(
            f"powercap vs static-split at the same caps: tokens/s {_signed(comparison['powercapVsStaticTokensPercent'])} "
            f"({by_service}), tokens/J {_signed(comparison['powercapVsStaticTokensPerJoulePercent'])}"
        )
    if "noCappingVsStaticTokensPercent" in comparison:
        lines.append(
            f"no-capping vs static-split: tokens/s {_signed(comparison['noCappingVsStaticTokensPercent'])} "
            "(what the caps cost the equal split; no split of the same caps can win back more)"
        )
    if "powercapVsNoCappingEnergyPercent" in comparison:
        lines.append(
            f"powercap vs no-capping: energy {_signed(comparison['powercapVsNoCappingEnergyPercent'])}, "
            f"tokens/s {_signed(comparison['powercapVsNoCappingTokensPercent'])}"
        )
    powercap = summary["strategies"].get("powercap")
    for change in (powercap or {}).get("capChanges", []):
        recovery = change["recoveryS"]
        back = f"back under the cap in {recovery:.1f} s" if recovery is not None else "never back under the cap"
        lines.append(f"cap change at {change['atS']:g} s ({change['policy']} -> {change['powerCapLimitW']} W): powercap {back}")
    return lines


def format_table(rows: list[list[str]]) -> list[str]:
    """The table's rows as aligned text lines (a rule under the two header lines)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if index == 1:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def render_html(
    summary: dict[str, Any],
    intro: list[str],
    notices: list[str],
    images: list[tuple[str, bytes]],
    scenario_text: str,
    missing_plots: str | None = None,
) -> str:
    """report.html: one self-contained page (no file or network reference) with the scenario
    line, the notices, the results table, the comparisons, every plot as a base64 PNG and the
    scenario's text, to open in a browser or attach to a ticket."""
    info = summary["scenario"]
    rows = results_table(summary)
    title = f"powercap simulate: {info['name']}"
    head = "".join(f"<th>{escape(a)}<br><small>{escape(b)}</small></th>" for a, b in zip(rows[0], rows[1]))
    body_rows = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[2:]
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse}th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
        "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.note{color:#8a4b00}</style>",
        "</head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    if info.get("description"):
        parts.append(f"<p>{escape(info['description'])}</p>")
    parts += [f"<p>{escape(line)}</p>" for line in intro]
    parts += [f'<p class="note">note: {escape(line)}</p>' for line in notices]
    parts += [
        "<h2>Results</h2>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{body_rows}</tbody></table>",
    ]
    parts += [f"<p>{escape(line)}</p>" for line in comparison_lines(summary)]
    parts.append("<h2>Plots</h2>")
    if missing_plots:
        parts.append(f'<p class="note">{escape(missing_plots)}</p>')
    for name, data in images:
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<h3>{escape(name)}</h3><img alt="{escape(name)}" src="data:image/png;base64,{encoded}">')
    parts += [
        "<h2>Scenario</h2>",
        f"<pre>{escape(scenario_text)}</pre>",
        "<p><small>Written by <code>powercap simulate</code>; docs/simulator.md explains every figure and plot.</small></p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.1f} %"


def _signed(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:+.1f} %"
