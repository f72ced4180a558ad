"""Simulator figures: recovery after cap changes, seconds within the cap,
powercap's tokens/s against the static equal split at the same caps, what bounds that gain,
and speed.

    .venv/bin/python benchmarks/simulator.py [--seeds 1 2 3] [--no-variants]   (prints markdown)

Runs, each with no capping, the static split, powercap and the oracle bound (the best split
of the same caps, knowing every GPU's load: ``powercap.simulation.engine.ORACLE``):

- ``default``: the built-in scenario (64 GPUs, 600 s, one compressed day), per seed;
- ``saturated``: the same with every service's traffic x 1.5 (sustained overload);
- ``cap-steps``: the default scenario with six powerCapLimit changes (three cuts, three raises)
  on chat and code during their busy hours; every change's recovery time is reported;
- equal tokens (unless ``--no-capacity``): the dual of the same-caps comparison, per
  service and seed: the static split's tokens/s at the service's cap, and the smallest cap
  (bisection on a factor of the service's powerCapLimit and its cap changes, the other
  services unchanged) at which powercap, and the oracle, serve as many of that service's
  tokens; "less power" is ``1 - factor``. A flat top of the throughput curve makes tokens/s
  gains small and power savings large, so this is the figure comparable with POLCA's
  "more servers under the same power budget";
- share of the oracle's gain (issue 14): on ``default``, ``saturated``, ``cap-steps`` and a
  service on mixed GPU types (``mixed_gpus(8000, 0.4, 1.25)``), powercap's tokens/s gain over
  the static split as a share of the oracle's, seeds' mean, for the cluster and each
  service, and the runs (cluster or service) below the static split;
- variants (unless ``--no-variants``): the default scenario with one choice changed at a
  time (caps, routing, day shape, one policy for two services), a service on mixed GPU
  types, and powercap's own settings (margin, headroom, controller period, a slower day);
  the table of what was tried in docs/benchmarks.md.

Speed: wall time of each strategy's run of the default scenario (64 GPUs, 600 simulated
seconds), as simulated seconds per wall second; "all three" is the sum of the three
strategies ``powercap simulate`` runs (the oracle is left out).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powercap.allocation import AllocationSettings  # noqa: E402
from powercap.marginal import MarginalSettings  # noqa: E402
from powercap.simulation.engine import NO_CAPPING, ORACLE, POWERCAP, STATIC_SPLIT, EngineSettings, SimulationResult, simulate  # noqa: E402
from powercap.simulation.scenario import Scenario, default_scenario_text, scenario_from_document  # noqa: E402
from powercap.simulation.summary import summarize  # noqa: E402

ALL = (NO_CAPPING, STATIC_SPLIT, POWERCAP, ORACLE)
SHOWN = ("no-capping", "static-split", "powercap")
SATURATION = 1.5
CAP_STEPS = [
    {"atS": 100, "policy": "inference/code", "powerCapLimit": 3800},
    {"atS": 160, "policy": "inference/code", "powerCapLimit": 5200},
    {"atS": 200, "policy": "inference/chat", "powerCapLimit": 4400},
    {"atS": 240, "policy": "inference/chat", "powerCapLimit": 6400},
    {"atS": 280, "policy": "inference/chat", "powerCapLimit": 4200},
    {"atS": 330, "policy": "inference/chat", "powerCapLimit": 5400},
]

Document = dict[str, Any]


def default_document() -> Document:
    return yaml.safe_load(default_scenario_text())


def _service(document: Document, name: str) -> Document:
    return next(s for s in document["services"] if s["name"] == name)


def _policy(document: Document, name: str) -> Document:
    return next(p for p in document["policies"] if p["metadata"]["name"] == name)


def saturated(document: Document) -> Document:
    result = copy.deepcopy(document)
    for service in result["services"]:
        service["peakTokensS"] = service["peakTokensS"] * SATURATION
    return result


def with_cap_steps(document: Document) -> Document:
    result = copy.deepcopy(document)
    result["events"] = CAP_STEPS
    return result


# -- variants of the default scenario: one choice changed at a time -------------------------


def caps(chat: int, code: int, batch: int, cut: int | None) -> Callable[[Document], Document]:
    def change(document: Document) -> Document:
        for name, watts in (("chat", chat), ("code", code), ("batch", batch)):
            _policy(document, name)["spec"]["powerCapLimit"] = watts
        document["events"] = [] if cut is None else [{**document["events"][0], "powerCapLimit": cut}]
        return document
    return change


def routing(services: Sequence[str], skew: float, bound: float) -> Callable[[Document], Document]:
    def change(document: Document) -> Document:
        for name in services:
            _service(document, name).update(podSkew=skew, loadBound=bound)
        return document
    return change


def previous_routing(document: Document) -> Document:
    """The routing of the scenario before: every service nearly even."""
    for name, skew in (("chat", 0.4), ("code", 0.4), ("batch", 0.2)):
        _service(document, name).update(podSkew=skew, loadBound=1.25)
    return document


def both(*changes: Callable[[Document], Document]) -> Callable[[Document], Document]:
    def change(document: Document) -> Document:
        for one in changes:
            document = one(document)
        return document
    return change


def flat_day(document: Document) -> Document:
    for service in document["services"]:
        service["dailyShape"] = "flat"
    document["events"] = []
    return document


def shared_policy(cap_w: int) -> Callable[[Document], Document]:
    """One policy over chat and code (same namespace, one selector): watts can move between them."""
    def change(document: Document) -> Document:
        chat, code = _policy(document, "chat"), _policy(document, "code")
        racks = {c["rackId"]: c for c in chat["spec"]["rackConstraints"] + code["spec"]["rackConstraints"]}
        serving = copy.deepcopy(chat)
        serving["metadata"]["name"] = "serving"
        serving["spec"]["powerCapLimit"] = cap_w
        serving["spec"]["rackConstraints"] = [racks[r] for r in sorted(racks)]
        document["policies"] = [p for p in document["policies"] if p not in (chat, code)] + [serving]
        for name in ("chat", "code"):
            _service(document, name)["policy"] = "serving"
        document["events"] = []
        return document
    return change


VARIANTS: list[tuple[str, Callable[[Document], Document]]] = [
    ("the scenario before: caps 84/77/94 % of the peaks (chat 7000 -> 5800 W), even routing",
     both(caps(7000, 5600, 3600, 5800), previous_routing)),
    ("today's caps, even routing (podSkew 0.4/0.4/0.2, loadBound 1.25)", previous_routing),
    ("caps of the scenario before, today's routing", caps(7000, 5600, 3600, 5800)),
    ("**the default scenario**", lambda document: document),
    ("deeper caps: 55-63 % of the peaks (chat 5200 -> 4000, code 4400, batch 2100 W)", caps(5200, 4400, 2100, 4000)),
    ("gentler caps: 76-84 % of the peaks (chat 7000 -> 5400, code 6000, batch 2900 W)", caps(7000, 6000, 2900, 5400)),
    ("chat and code bounded at 2x the mean load", routing(("chat", "code"), 0.8, 2.0)),
    ("chat and code: podSkew 1.2, no load bound", routing(("chat", "code"), 1.2, 100.0)),
    ("batch routed with affinity too (podSkew 0.8, loadBound 1.5)", routing(("batch",), 0.8, 1.5)),
    ("flat day: every service at its peak all run, no cap change", flat_day),
    ("one policy over chat and code, 11600 W (= 6400 + 5200), no cap change", shared_policy(11600)),
]


def mixed_gpus(cap_w: int, skew: float, bound: float) -> Document:
    """A 34B coding service on 16 H200-like and 16 L40S-like GPUs, one pod per GPU, office day.

    Uncapped it draws up to 16 x 605 + 16 x 315 = 14.7 kW flat out; offered traffic peaks at
    90 % of its uncapped capacity. The router splits by capacity (H200 pods get 2.7x more).
    """
    capacity = 8 * 2 * (3000 + 1100) * 0.5 * 70 / 34
    return {
        "name": "mixed-gpus",
        "durationS": 600,
        "racks": [{"id": "r"}],
        "nodes": [
            {"name": "h200", "count": 2, "rack": "r", "gpuModel": "H200-like"},
            {"name": "l40s", "count": 2, "rack": "r", "gpuModel": "L40S-like"},
        ],
        "policies": [{
            "apiVersion": "powercapping.example.com/v1alpha1",
            "kind": "PowerCappingPolicy",
            "metadata": {"name": "code", "namespace": "inference"},
            "spec": {"powerCapLimit": cap_w},
        }],
        "services": [{
            "name": "code", "namespace": "inference", "policy": "code", "replicas": 32, "modelSizeB": 34,
            "prefillShare": 0.5, "peakTokensS": 0.9 * capacity, "dailyShape": "office",
            "podSkew": skew, "loadBound": bound, "maxQueueS": 20,
        }],
        "workload": {"dayStartHour": 6},
    }


MIXED: list[tuple[str, Document]] = [
    (f"code on 16 H200 + 16 L40S, {cap} W ({cap // 32} W/GPU), podSkew {skew}, loadBound {bound}", mixed_gpus(cap, skew, bound))
    for cap in (8000, 9600) for skew, bound in ((0.4, 1.25), (0.8, 1.5))
]

TUNING: list[tuple[str, EngineSettings, dict[str, float]]] = [
    ("as shipped (whole powerCapLimit, 10 % headroom, 10 % step, 5 s rounds, rebalancing on)", EngineSettings(), {}),
    ("3 % margin, rebalancing off (the defaults before #14)",
     EngineSettings(allocation=AllocationSettings(margin=0.03, marginal=MarginalSettings(enabled=False))), {}),
    ("3 % margin", EngineSettings(allocation=AllocationSettings(margin=0.03)), {}),
    ("headroom 2 % of the range", EngineSettings(allocation=AllocationSettings(headroom_fraction=0.02)), {}),
    ("step 30 % of the range", EngineSettings(allocation=AllocationSettings(step_fraction=0.3)), {}),
    ("controller every 1 s", EngineSettings(), {"controller_interval_s": 1.0}),
    ("headroom 2 %, step 30 % and a 1-s controller together", EngineSettings(allocation=AllocationSettings(headroom_fraction=0.02, step_fraction=0.3)),
     {"controller_interval_s": 1.0}),
    ("marginal-value rebalancing off (controller --no-marginal-rebalancing)",
     EngineSettings(allocation=AllocationSettings(marginal=MarginalSettings(enabled=False))), {}),
]


# -- running and formatting ----------------------------------------------------------------


def run(scenario: Scenario, strategies: Sequence[Any] = ALL, settings: EngineSettings | None = None) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    summary = summarize(simulate(scenario, strategies, settings=settings, clock=time.perf_counter))
    return summary, time.perf_counter() - started


SHARE_SCENARIOS: list[tuple[str, Callable[[], Document]]] = [
    ("default", default_document),
    ("saturated", lambda: saturated(default_document())),
    ("cap-steps", lambda: with_cap_steps(default_document())),
    ("mixed GPUs (code on 16 H200 + 16 L40S, 8000 W)", lambda: mixed_gpus(8000, 0.4, 1.25)),
]


def share_runs(seeds: Sequence[int], settings: EngineSettings | None = None) -> None:
    """powercap's gain over the static split as a share of the oracle's, per scenario (issue 14, item 1)."""
    print("\nShare of the oracle's gain (powercap's tokens/s gain over the static split / the oracle's, "
          f"means over seeds {', '.join(map(str, seeds))}; per service chat / code / batch, or the one service):\n")
    print("| scenario | powercap, cluster | oracle, cluster | share, cluster | share per service | runs below the static split |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for label, document in SHARE_SCENARIOS:
        pcs, oracles, below = [], [], []
        pc_services: dict[str, list[float]] = {}
        oracle_services: dict[str, list[float]] = {}
        for seed in seeds:
            scenario = scenario_from_document(document()).with_overrides(seed=seed)
            summary = summarize(simulate(scenario, (STATIC_SPLIT, POWERCAP, ORACLE), settings=settings))
            pc, pc_per = versus_static(summary, "powercap")
            oracle, oracle_per = versus_static(summary, "oracle")
            pcs.append(pc)
            oracles.append(oracle)
            below += [f"seed {seed} cluster {pc:+.2f} %"] if pc < 0 else []
            for name, value in pc_per.items():
                pc_services.setdefault(name, []).append(value)
                oracle_services.setdefault(name, []).append(oracle_per[name])
                below += [f"seed {seed} {name} {value:+.2f} %"] if value < 0 else []
        share = " / ".join(f"{100 * statistics.mean(pc_services[n]) / statistics.mean(oracle_services[n]):.0f} %" for n in pc_services)
        print(f"| {label} | {spread(pcs, 2)} | {spread(oracles, 2)} | {100 * statistics.mean(pcs) / statistics.mean(oracles):.0f} % | "
              f"{share} | {'; '.join(below) or 'none'} |", flush=True)


def power_before(result: SimulationResult, change: dict[str, Any]) -> float:
    """powercap's service power (1-s average) in the second before a cap change: does the cut bite?"""
    recorder = next(r for r in result.runs if r.strategy.name == "powercap").recorder
    service = next(s.name for s in result.scenario.services if f"{s.namespace}/{s.policy_name}" == change["policy"])
    return recorder.service_energy_j[recorder.services.index(service)][int(change["atS"]) - 1]


def change_percent(new: float, old: float) -> float:
    return 100.0 * (new / old - 1.0)


def versus_static(summary: dict[str, Any], name: str) -> tuple[float, dict[str, float]]:
    """``name``'s tokens/s against the static split: the cluster, and per service, in %."""
    strategies = summary["strategies"]
    static, other = strategies["static-split"], strategies[name]
    per_service = {
        service: change_percent(figures["tokensPerSecond"], static["services"][service]["tokensPerSecond"])
        for service, figures in other["services"].items()
    }
    return change_percent(other["tokensPerSecond"], static["tokensPerSecond"]), per_service


def spread(values: Sequence[float], digits: int = 1, signed: bool = True) -> str:
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{statistics.mean(values):{sign}.{digits}f} ({min(values):{sign}.{digits}f} to {max(values):{sign}.{digits}f})"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()}, load average {load()}"


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-variants", action="store_true", help="leave out the table of what was tried")
    parser.add_argument("--no-capacity", action="store_true", help="leave out the equal-tokens runs")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}")
    print(f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    main_runs(args.seeds)
    share_runs(args.seeds)
    if not args.no_capacity:
        capacity_runs(args.seeds)
    if not args.no_variants:
        variant_runs(args.seeds)
    print(f"\nload average at the end: {load()}")
    return 0


def main_runs(seeds: Sequence[int]) -> None:
    rows = []
    speeds = []
    recoveries = []
    for seed in seeds:
        for variant, document in (("default", default_document()), ("saturated", saturated(default_document()))):
            scenario = scenario_from_document(document).with_overrides(seed=seed)
            result = simulate(scenario, ALL, clock=time.perf_counter)
            summary = summarize(result)
            strategies = summary["strategies"]
            rows.append({
                "variant": variant,
                "seed": seed,
                "powercap": versus_static(summary, "powercap"),
                "oracle": versus_static(summary, "oracle"),
                "static_vs_uncapped": change_percent(strategies["static-split"]["tokensPerSecond"], strategies["no-capping"]["tokensPerSecond"]),
                "ceiling": versus_static(summary, "no-capping"),
                "tokens_per_joule": summary["comparison"]["powercapVsStaticTokensPerJoulePercent"],
                "within_all": [strategies[n]["withinCapPercent"] for n in SHOWN],
                "within_after": [strategies[n]["withinCapPercentAfterConvergence"] for n in SHOWN],
                "rack": [(strategies[n]["rackPowerViolationSeconds"], strategies[n]["rackTemperatureViolationSeconds"]) for n in SHOWN],
                "p99": {n: [v["p99LatencyProxyS"] for v in strategies[n]["services"].values()] for n in (*SHOWN, "oracle")},
                "dropped": {n: [v["droppedPercent"] for v in strategies[n]["services"].values()] for n in (*SHOWN, "oracle")},
            })
            recoveries += [(variant, seed, c, power_before(result, c)) for c in strategies["powercap"]["capChanges"]]
            if variant == "default":
                speeds.append((seed, {n: strategies[n]["wallSeconds"] for n in SHOWN}, scenario.duration_s))
        steps_scenario = scenario_from_document(with_cap_steps(default_document())).with_overrides(seed=seed)
        result = simulate(steps_scenario, [POWERCAP])
        recoveries += [
            ("cap-steps", seed, c, power_before(result, c)) for c in summarize(result)["strategies"]["powercap"]["capChanges"]
        ]

    print("powercap and the oracle bound against the static split at the same caps (tokens/s, % change; "
          "chat / code / batch), and the ceiling: no capping at all against the static split (every GPU at its "
          "maximum; no split of any cap can serve more):\n")
    print("| variant | seed | powercap, cluster | powercap per service | oracle, cluster | oracle per service | "
          "ceiling, cluster | ceiling per service | powercap tokens/J vs static |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | --- | ---: |")
    for row in rows:
        cells = []
        for name in ("powercap", "oracle", "ceiling"):
            cluster, per_service = row[name]
            cells += [f"{cluster:+.1f}", " / ".join(f"{v:+.1f}" for v in per_service.values())]
        print(f"| {row['variant']} | {row['seed']} | " + " | ".join(cells) + f" | {row['tokens_per_joule']:+.1f} |")
    for variant in ("default", "saturated"):
        gains = [r["powercap"][0] for r in rows if r["variant"] == variant]
        bounds = [r["oracle"][0] for r in rows if r["variant"] == variant]
        ceilings = [r["ceiling"][0] for r in rows if r["variant"] == variant]
        print(f"\n{variant}: powercap vs static tokens/s {spread(gains, 2)} %, oracle {spread(bounds, 2)} %, "
              f"ceiling {spread(ceilings, 2)} % over {len(gains)} seed(s) (target >= +10 %)")

    print("\nCaps and racks: % of seconds within the caps (no-capping / static / powercap), all and after convergence; "
          "rack maxPower, maxTemperature violation seconds:\n")
    print("| variant | seed | within cap, all s | after convergence | rack W, °C violation s |")
    print("| --- | ---: | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['seed']} | " + " / ".join(f"{v:.2f}" for v in row["within_all"])
              + " | " + " / ".join(f"{v:.2f}" for v in row["within_after"])
              + " | " + " / ".join(f"{p}, {t}" for p, t in row["rack"]) + " |")

    print("\np99 latency proxy, s, and tokens dropped, % (chat / code / batch):\n")
    print("| variant | seed | no-capping | static-split | powercap | oracle |")
    print("| --- | ---: | --- | --- | --- | --- |")
    for row in rows:
        cells = [
            " / ".join(f"{v:.1f}" for v in row["p99"][n]) + " s; " + " / ".join(f"{v:.1f}" for v in row["dropped"][n]) + " %"
            for n in (*SHOWN, "oracle")
        ]
        print(f"| {row['variant']} | {row['seed']} | " + " | ".join(cells) + " |")

    print("\nRecovery after a cap change (powercap; power stays <= the new cap for 10 s from then on):\n")
    print("| variant | seed | at s | policy | new cap W | service power the second before, W | recovery s |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for variant, seed, change, before_w in recoveries:
        recovery = change["recoveryS"]
        print(f"| {variant} | {seed} | {change['atS']:g} | {change['policy']} | {change['powerCapLimitW']} | {before_w:.0f} | "
              f"{'never' if recovery is None else f'{recovery:.1f}'} |")
    worst = max((c["recoveryS"] for _, _, c, _ in recoveries if c["recoveryS"] is not None), default=None)
    print(f"\nworst recovery: {worst} s over {len(recoveries)} changes (target <= 3 s)")

    print("\nSpeed, default scenario (64 GPUs, 600 simulated s), wall seconds:\n")
    print("| seed | no-capping | static-split | powercap | all three | x real time (slowest strategy) | x real time (all three) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed, per_strategy, duration_s in speeds:
        slowest, total = max(per_strategy.values()), sum(per_strategy.values())
        print(f"| {seed} | " + " | ".join(f"{per_strategy[n]:.2f}" for n in SHOWN)
              + f" | {total:.2f} | {duration_s / slowest:.0f} | {duration_s / total:.0f} |")


# -- equal tokens: how much less power serves the static split's tokens -----------------------


CAPACITY_FACTORS = (0.5, 1.25)
"""The range the bisection searches, as factors of the service's powerCapLimit."""
CAPACITY_STEPS = 7


def with_cap_factor(document: Document, policy: str, factor: float) -> Document:
    """The scenario with one policy's powerCapLimit, and its cap changes, times ``factor``."""
    result = copy.deepcopy(document)
    spec = _policy(result, policy)["spec"]
    spec["powerCapLimit"] = round(spec["powerCapLimit"] * factor)
    for event in result.get("events", []):
        if event["policy"].rpartition("/")[2] == policy:
            event["powerCapLimit"] = round(event["powerCapLimit"] * factor)
    return result


Loader = Callable[[Document], Scenario]
"""How a scenario document becomes a scenario (one that replays a trace needs its reader)."""


def service_tokens_per_second(document: Document, seed: int, strategy: Any, service: str,
                              load: Loader = scenario_from_document) -> float:
    summary, _ = run(load(document).with_overrides(seed=seed), [strategy])
    return float(summary["strategies"][strategy.name]["services"][service]["tokensPerSecond"])


def cap_factor_for(document: Document, seed: int, strategy: Any, service: str, tokens_per_second: float,
                   load: Loader = scenario_from_document) -> float | None:
    """The smallest factor of the service's cap at which ``strategy`` serves ``tokens_per_second``
    (to 1/128 of the search range), None when not even the top of the range does."""
    low, high = CAPACITY_FACTORS
    policy = _service(document, service)["policy"]
    if service_tokens_per_second(with_cap_factor(document, policy, high), seed, strategy, service, load) < tokens_per_second:
        return None
    for _ in range(CAPACITY_STEPS):
        middle = (low + high) / 2
        if service_tokens_per_second(with_cap_factor(document, policy, middle), seed, strategy, service, load) >= tokens_per_second:
            high = middle
        else:
            low = middle
    return high


def capacity_runs(seeds: Sequence[int], document: Document | None = None, load: Loader = scenario_from_document,
                  label: str = "default scenario") -> dict[str, list[float]]:
    """The equal-tokens table; returns the savings, % less power, per "service strategy"."""
    document = document or default_document()
    caps_w = {s["name"]: _policy(document, s["policy"])["spec"]["powerCapLimit"] for s in document["services"]}
    print(f"\nEqual tokens, {label}: the static split's tokens/s at each service's cap, and the cap at which "
          "powercap and the oracle serve as many (one service's cap scaled, the others unchanged):\n")
    print("| service | seed | static split: cap W, tokens/s | powercap: cap W, less power | oracle: cap W, less power |")
    print("| --- | ---: | --- | --- | --- |")
    savings: dict[str, list[float]] = {}
    for service, cap_w in caps_w.items():
        for seed in seeds:
            static = service_tokens_per_second(document, seed, STATIC_SPLIT, service, load)
            cells = []
            for strategy in (POWERCAP, ORACLE):
                factor = cap_factor_for(document, seed, strategy, service, static, load)
                if factor is None:
                    cells.append(f"more than {CAPACITY_FACTORS[1] * cap_w:.0f} W")
                    continue
                savings.setdefault(f"{service} {strategy.name}", []).append(100 * (1 - factor))
                less = 100 * (1 - factor)
                cells.append(f"{factor * cap_w:.0f} W, {less:.1f} % less" if less >= 0 else f"{factor * cap_w:.0f} W, {-less:.1f} % more")
            print(f"| {service} | {seed} | {cap_w} W, {static:.0f} | " + " | ".join(cells) + " |", flush=True)
    print("\nless power for the static split's tokens, mean (min to max) %: "
          + "; ".join(f"{key} {spread(values, 1, signed=False)}" for key, values in savings.items()))
    return savings


def variant_runs(seeds: Sequence[int]) -> None:
    print(f"\nWhat was tried: the default scenario with one choice changed (seeds {', '.join(map(str, seeds))}: "
          "mean (min to max)); tokens/s against the static split at the same caps, %:\n")
    print("| variant | static vs no-capping | powercap, cluster | powercap chat / code / batch (means) | oracle, cluster | "
          "oracle chat / code / batch (means) | dropped % no-capping / static / powercap / oracle (means) |")
    print("| --- | ---: | ---: | --- | ---: | --- | --- |")
    for label, change in VARIANTS:
        print(variant_row(label, [scenario_from_document(change(default_document())).with_overrides(seed=s) for s in seeds]), flush=True)
    for label, document in MIXED:
        print(variant_row(label, [scenario_from_document(copy.deepcopy(document)).with_overrides(seed=s) for s in seeds]), flush=True)

    first = scenario_from_document(default_document()).with_overrides(seed=seeds[0])
    static = summarize(simulate(first, [STATIC_SPLIT]))["strategies"]["static-split"]
    print(f"\npowercap's own settings on the default scenario (seed {seeds[0]}), tokens/s against the static split, %:\n")
    print("| powercap settings | cluster | chat / code / batch | within cap after convergence, % |")
    print("| --- | ---: | --- | ---: |")
    for label, settings, timing in TUNING:
        scenario = dataclasses.replace(first, timing=dataclasses.replace(first.timing, **timing)) if timing else first
        figures = summarize(simulate(scenario, [POWERCAP], settings=settings))["strategies"]["powercap"]
        per_service = " / ".join(
            f"{change_percent(f['tokensPerSecond'], static['services'][name]['tokensPerSecond']):+.1f}" for name, f in figures["services"].items()
        )
        print(f"| {label} | {change_percent(figures['tokensPerSecond'], static['tokensPerSecond']):+.1f} | {per_service} | "
              f"{figures['withinCapPercentAfterConvergence']:.2f} |", flush=True)
    slow = scenario_from_document(default_document()).with_overrides(seed=seeds[0], duration_s=4 * first.duration_s)
    summary, _ = run(slow, (STATIC_SPLIT, POWERCAP, ORACLE))
    pc, oracle = versus_static(summary, "powercap")[0], versus_static(summary, "oracle")[0]
    print(f"\nthe day in 2400 s instead of 600 s (seed {seeds[0]}): powercap {pc:+.1f} %, oracle {oracle:+.1f} % against the static split")


def variant_row(label: str, scenarios: Sequence[Scenario]) -> str:
    pcs, oracles, costs = [], [], []
    pc_services: dict[str, list[float]] = {}
    oracle_services: dict[str, list[float]] = {}
    dropped: dict[str, list[float]] = {}
    for scenario in scenarios:
        summary, _ = run(scenario)
        strategies = summary["strategies"]
        pc, pc_per = versus_static(summary, "powercap")
        oracle, oracle_per = versus_static(summary, "oracle")
        pcs.append(pc)
        oracles.append(oracle)
        costs.append(change_percent(strategies["static-split"]["tokensPerSecond"], strategies["no-capping"]["tokensPerSecond"]))
        for name, value in pc_per.items():
            pc_services.setdefault(name, []).append(value)
        for name, value in oracle_per.items():
            oracle_services.setdefault(name, []).append(value)
        for name in (*SHOWN, "oracle"):
            dropped.setdefault(name, []).append(strategies[name]["droppedPercent"])
    return (
        f"| {label} | {spread(costs)} | {spread(pcs)} | " + " / ".join(f"{statistics.mean(v):+.1f}" for v in pc_services.values())
        + f" | {spread(oracles)} | " + " / ".join(f"{statistics.mean(v):+.1f}" for v in oracle_services.values())
        + " | " + " / ".join(f"{statistics.mean(v):.1f}" for v in dropped.values()) + " |"
    )


if __name__ == "__main__":
    sys.exit(main())
