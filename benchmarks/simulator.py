"""Simulator figures (issue 7, item 8): recovery after cap changes, seconds within the cap,
powercap's tokens/s against the static equal split at the same caps, and speed.

    .venv/bin/python benchmarks/simulator.py [--seeds 1 2 3]      (prints markdown tables)

Runs, each with the three strategies (no capping, static split, powercap):

- ``default``: the built-in scenario (64 GPUs, 600 s, one compressed day), per seed;
- ``saturated``: the same with every service's traffic x 1.5, so that the caps bind
  through the busy hours and tokens/s measures what each strategy can serve under them;
- ``cap-steps``: the default scenario with six powerCapLimit changes (down and up) on
  chat and code during their busy hours; every change's recovery time is reported.

Speed: wall time of each strategy's run of the default scenario (64 GPUs, 600 simulated
seconds) and of all three together, as simulated seconds per wall second.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powercap.simulation.engine import simulate  # noqa: E402
from powercap.simulation.scenario import Scenario, default_scenario_text, scenario_from_document  # noqa: E402
from powercap.simulation.summary import summarize  # noqa: E402

SATURATION = 1.5
CAP_STEPS = [
    {"atS": 100, "policy": "inference/code", "powerCapLimit": 4600},
    {"atS": 160, "policy": "inference/code", "powerCapLimit": 5600},
    {"atS": 200, "policy": "inference/chat", "powerCapLimit": 6000},
    {"atS": 240, "policy": "inference/chat", "powerCapLimit": 7000},
    {"atS": 280, "policy": "inference/chat", "powerCapLimit": 5600},
    {"atS": 330, "policy": "inference/chat", "powerCapLimit": 6400},
]


def default_document() -> dict[str, Any]:
    return yaml.safe_load(default_scenario_text())


def saturated(document: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(document)
    for service in result["services"]:
        service["peakTokensS"] = service["peakTokensS"] * SATURATION
    return result


def with_cap_steps(document: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(document)
    result["events"] = CAP_STEPS
    return result


def run(scenario: Scenario) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    summary = summarize(simulate(scenario, clock=time.perf_counter))
    return summary, time.perf_counter() - started


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()}, load average {load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}")
    print(f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")

    rows = []
    speeds = []
    recoveries = []
    for seed in args.seeds:
        for variant, document in (("default", default_document()), ("saturated", saturated(default_document()))):
            scenario = scenario_from_document(document).with_overrides(seed=seed)
            summary, wall_s = run(scenario)
            strategies = summary["strategies"]
            powercap, static = strategies["powercap"], strategies["static-split"]
            rows.append({
                "variant": variant,
                "seed": seed,
                "vs_static_tokens": summary["comparison"]["powercapVsStaticTokensPercent"],
                "by_service": summary["comparison"]["powercapVsStaticTokensPercentByService"],
                "vs_static_tokens_per_joule": summary["comparison"]["powercapVsStaticTokensPerJoulePercent"],
                "within_all": {name: s["withinCapPercent"] for name, s in strategies.items()},
                "within_after": {name: s["withinCapPercentAfterConvergence"] for name, s in strategies.items()},
                "rack": {name: (s["rackPowerViolationSeconds"], s["rackTemperatureViolationSeconds"]) for name, s in strategies.items()},
                "p99": {name: {k: v["p99LatencyProxyS"] for k, v in s["services"].items()} for name, s in strategies.items()},
                "dropped": {name: s["droppedPercent"] for name, s in strategies.items()},
                "tokens": {name: s["tokensPerSecond"] for name, s in strategies.items()},
                "static_tokens": static["tokensPerSecond"],
                "powercap_tokens": powercap["tokensPerSecond"],
            })
            recoveries += [(variant, seed, c) for c in powercap["capChanges"]]
            if variant == "default":
                speeds.append((seed, wall_s, {name: s["wallSeconds"] for name, s in strategies.items()}, scenario.duration_s))
        steps = scenario_from_document(with_cap_steps(default_document())).with_overrides(seed=seed)
        summary, _ = run(steps)
        recoveries += [("cap-steps", seed, c) for c in summary["strategies"]["powercap"]["capChanges"]]

    print("powercap vs static-split at the same caps (tokens/s, % change):\n")
    print("| variant | seed | all services | per service | tokens/J | within cap, all s (no-capping / static / powercap) | after convergence | rack W / °C violation s (no-capping / static / powercap) |")
    print("| --- | ---: | ---: | --- | ---: | --- | --- | --- |")
    for row in rows:
        per_service = ", ".join(f"{k} {v:+.1f}" for k, v in row["by_service"].items())
        within = " / ".join(f"{v:.2f}" for v in row["within_all"].values())
        after = " / ".join(f"{v:.2f}" for v in row["within_after"].values())
        racks = " / ".join(f"{p}, {t}" for p, t in row["rack"].values())
        print(f"| {row['variant']} | {row['seed']} | {row['vs_static_tokens']:+.1f} | {per_service} | "
              f"{row['vs_static_tokens_per_joule']:+.1f} | {within} | {after} | {racks} |")
    for variant in ("default", "saturated"):
        gains = [r["vs_static_tokens"] for r in rows if r["variant"] == variant]
        print(f"\n{variant}: mean powercap vs static tokens/s {statistics.mean(gains):+.2f} % over {len(gains)} seed(s) (target >= +10 %)")

    print("\np99 latency proxy, s (chat / code / batch), and dropped tokens %:\n")
    print("| variant | seed | no-capping | static-split | powercap |")
    print("| --- | ---: | --- | --- | --- |")
    for row in rows:
        cells = []
        for name in ("no-capping", "static-split", "powercap"):
            p99 = " / ".join(f"{v:.1f}" for v in row["p99"][name].values())
            cells.append(f"{p99} ({row['dropped'][name]:.1f} % dropped)")
        print(f"| {row['variant']} | {row['seed']} | " + " | ".join(cells) + " |")

    print("\nRecovery after a cap change (powercap; power stays <= the new cap for 10 s from then on):\n")
    print("| variant | seed | at s | policy | new cap W | recovery s |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for variant, seed, change in recoveries:
        recovery = change["recoveryS"]
        print(f"| {variant} | {seed} | {change['atS']:g} | {change['policy']} | {change['powerCapLimitW']} | "
              f"{'never' if recovery is None else f'{recovery:.1f}'} |")
    worst = max((c["recoveryS"] for _, _, c in recoveries if c["recoveryS"] is not None), default=None)
    print(f"\nworst recovery: {worst} s over {len(recoveries)} changes (target <= 3 s)")

    print("\nSpeed, default scenario (64 GPUs, 600 simulated s):\n")
    print("| seed | no-capping s | static-split s | powercap s | all three s | x real time (slowest strategy) | x real time (all three) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed, wall_s, per_strategy, duration_s in speeds:
        slowest = max(per_strategy.values())
        print(f"| {seed} | " + " | ".join(f"{per_strategy[n]:.2f}" for n in ("no-capping", "static-split", "powercap"))
              + f" | {wall_s:.2f} | {duration_s / slowest:.0f} | {duration_s / wall_s:.0f} |")
    print(f"\nload average after: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
