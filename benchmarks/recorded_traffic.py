"""Recorded traffic (issue 14, item 6): the simulator figures on a real hour of Azure LLM requests.

    .venv/bin/python benchmarks/recorded_traffic.py [--seeds 1 2 3] [--no-capacity]
    .venv/bin/python benchmarks/recorded_traffic.py --write-scenario   (regenerates the scenario file)

The scenario (``benchmarks/scenarios/azure-conv.yaml``) is the built-in one with chat replaying
the Azure LLM inference trace of conversations (``../shared/data/azure-llm-2023/``, one hour of
2023, CC BY 4.0) at 6x, scaled so that its busiest minute is 80 % of what its 10 pods serve
uncapped: docs/simulator.md's recipe, run for as long as the hour plays (583 s). Code and
batch keep their synthetic days. Printed, as benchmarks/simulator.py prints them for the
synthetic scenarios: tokens/s of powercap, the oracle and no capping against the static split
at the same caps (cluster and per service, and powercap's share of the oracle's gain),
seconds within the caps, rack violations, p99 latency proxy, and (unless ``--no-capacity``)
the equal-tokens table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulator import ALL, SHOWN, Document, capacity_runs, default_document, machine, run, spread, versus_static  # noqa: E402

from powercap.simulation.cli import trace_reader  # noqa: E402
from powercap.simulation.scenario import Scenario, scenario_from_document  # noqa: E402

SCENARIO_PATH = Path(__file__).resolve().parent / "scenarios" / "azure-conv.yaml"
TRACE = "../../../shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
"""The trace, relative to the scenario file: ../shared/data beside the repository."""
HEADER = """\
# The recorded-traffic scenario of benchmarks/recorded_traffic.py (issue 14, item 6): the
# built-in scenario with chat replaying the Azure LLM inference trace of conversations
# (../shared/data/azure-llm-2023/ beside the repository; CC BY 4.0) at 6x, scaled so that its
# busiest minute is 80 % of what its 10 pods serve uncapped, for as long as the hour plays.
# Regenerate with `benchmarks/recorded_traffic.py --write-scenario`.
"""


def recorded_document() -> Document:
    document = default_document()
    document["name"] = "azure-conv"
    document["description"] = ("the built-in scenario, chat replaying an hour of Azure LLM conversation requests "
                               "(2023) at 6x, code and batch synthetic")
    del document["durationS"]
    chat = next(s for s in document["services"] if s["name"] == "chat")
    del chat["peakTokensS"], chat["dailyShape"]
    chat["trace"] = {"file": TRACE, "speedup": 6, "peakUtilisation": 0.8}
    return document


def load(document: Document) -> Scenario:
    """A scenario from a document whose trace files are relative to the scenario file."""
    return scenario_from_document(copy.deepcopy(document), read_trace=trace_reader(SCENARIO_PATH.parent))


def same_caps(seeds: Sequence[int], document: Document) -> None:
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        summary, _ = run(load(document).with_overrides(seed=seed), ALL)
        strategies = summary["strategies"]
        rows.append({
            "seed": seed,
            "powercap": versus_static(summary, "powercap"),
            "oracle": versus_static(summary, "oracle"),
            "ceiling": versus_static(summary, "no-capping"),
            "within": [strategies[n]["withinCapPercent"] for n in SHOWN],
            "rack": [(strategies[n]["rackPowerViolationSeconds"], strategies[n]["rackTemperatureViolationSeconds"]) for n in SHOWN],
            "p99": {n: [v["p99LatencyProxyS"] for v in strategies[n]["services"].values()] for n in (*SHOWN, "oracle")},
            "dropped": {n: [v["droppedPercent"] for v in strategies[n]["services"].values()] for n in (*SHOWN, "oracle")},
        })
    print("Same caps: tokens/s against the static split, % (cluster; chat / code / batch), and powercap's share of "
          "the oracle's gain:\n")
    print("| seed | powercap, cluster | powercap per service | oracle, cluster | oracle per service | share of the oracle's gain | "
          "ceiling (no capping), cluster |")
    print("| ---: | ---: | --- | ---: | --- | ---: | ---: |")
    for row in rows:
        (pc, pc_per), (oracle, oracle_per), (ceiling, _) = row["powercap"], row["oracle"], row["ceiling"]
        share = f"{100 * pc / oracle:.0f} %" if oracle > 0 else "n/a"
        print(f"| {row['seed']} | {pc:+.1f} | " + " / ".join(f"{v:+.1f}" for v in pc_per.values())
              + f" | {oracle:+.1f} | " + " / ".join(f"{v:+.1f}" for v in oracle_per.values())
              + f" | {share} | {ceiling:+.1f} |")
    gains, bounds = [r["powercap"][0] for r in rows], [r["oracle"][0] for r in rows]
    print(f"\nmeans: powercap {spread(gains, 2)} %, oracle {spread(bounds, 2)} %, share "
          f"{100 * statistics.mean(gains) / statistics.mean(bounds):.0f} % (target >= 75 %)")
    print("\nWithin the caps, % of seconds (no-capping / static / powercap); rack maxPower, maxTemperature violation s; "
          "p99 latency proxy s and dropped % (chat / code / batch):\n")
    print("| seed | within cap | rack W, °C violation s | " + " | ".join(f"{n}: p99 s; dropped %" for n in (*SHOWN, "oracle")) + " |")
    print("| ---: | --- | --- | " + " | ".join("---" for _ in (*SHOWN, "oracle")) + " |")
    for row in rows:
        cells = [" / ".join(f"{v:.1f}" for v in row["p99"][n]) + "; " + " / ".join(f"{v:.1f}" for v in row["dropped"][n])
                 for n in (*SHOWN, "oracle")]
        print(f"| {row['seed']} | " + " / ".join(f"{v:.2f}" for v in row["within"]) + " | "
              + " / ".join(f"{p}, {t}" for p, t in row["rack"]) + " | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-capacity", action="store_true", help="leave out the equal-tokens runs")
    parser.add_argument("--write-scenario", action="store_true", help=f"write {SCENARIO_PATH.name} and stop")
    args = parser.parse_args(argv)
    if args.write_scenario:
        SCENARIO_PATH.write_text(HEADER + yaml.safe_dump(recorded_document(), sort_keys=False, width=120), encoding="utf-8")
        print(f"wrote {SCENARIO_PATH}")
        return 0
    document: Any = yaml.safe_load(SCENARIO_PATH.read_text(encoding="utf-8"))
    try:
        load(document)
    except OSError as error:
        print(f"{SCENARIO_PATH.name}: cannot read the trace: {error}", file=sys.stderr)
        return 2
    print(f"Machine: {machine()}")
    print(f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; scenario {SCENARIO_PATH.name}; "
          f"seeds {', '.join(map(str, args.seeds))}\n")
    same_caps(args.seeds, document)
    if not args.no_capacity:
        capacity_runs(args.seeds, document, load, label="recorded traffic (chat replays the Azure trace)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
