"""More GPUs under the same rack power (issue 14, item 5): how many GPUs one rack holds.

    .venv/bin/python benchmarks/rack_density.py [--seeds 1 2 3] [--gpus 32] [--step 4] [--up-to 64]

One rack whose ``maxPower`` is what its nameplate servers with ``N`` H200-like GPUs draw with
the GPUs at their default power limit: ``N x (700 W + the server's power beside each GPU at
that load)`` (``physics.NODE_POWER_PRESETS``: 190 W idle + 185 W at full GPU power per GPU;
POLCA's "provisioned for the nameplate"). One service, one pod per GPU, on the compressed
office day of the built-in scenario, offered traffic peaking at 80 % of what the nameplate
GPUs serve uncapped. GPUs are added ``--step`` at a time with the traffic in proportion (the
rack is asked to serve ``(N + k) / N`` times the load). The servers' idle floor is not
cappable, so the GPUs' budget is what maxPower leaves with every GPU at its cap:
``powerCapLimit = (maxPower - (N + k) x idle) / (1 + load / 700)``, one policy with that cap
and the rack's maxPower, and each configuration runs with every strategy:

- ``no-capping``: every GPU free to draw its maximum: what breaks is the breaker (seconds
  over maxPower);
- ``static-split``: each GPU at ``powerCapLimit / (N + k)``;
- ``powercap``: the controller and the agents, splitting the same watts;
- ``oracle``: the same watts re-split every second knowing every GPU's load (the bound).

A configuration *holds* when its p99 latency proxy is within 10 % of the nameplate rack's (N
GPUs, no capping) on the same seed and no second is over maxPower. The figure per strategy is
the largest share of GPUs added before the first configuration that does not hold, on every
seed; POLCA reports +30 %.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulator import machine, run  # noqa: E402

from powercap.allocation import AllocationSettings  # noqa: E402
from powercap.marginal import MarginalSettings  # noqa: E402
from powercap.physics import H200_LIKE, NODE_POWER_PRESETS  # noqa: E402
from powercap.simulation.engine import NO_CAPPING, ORACLE, POWERCAP, STATIC_SPLIT, EngineSettings  # noqa: E402
from powercap.simulation.scenario import scenario_from_document  # noqa: E402

STRATEGIES = (NO_CAPPING, STATIC_SPLIT, POWERCAP, ORACLE)
LATENCY_SLACK = 1.10
PEAK_UTILISATION = 0.8
MODEL_SIZE_B = 34
PREFILL_SHARE = 0.5
GPUS_PER_NODE = 4


def tokens_per_gpu() -> float:
    """What one H200-like GPU serves uncapped for this service (docs/simulator.md, peakUtilisation)."""
    return H200_LIKE.peak_tokens_s * (1 - PREFILL_SHARE) * 70 / MODEL_SIZE_B


BESIDE = NODE_POWER_PRESETS[H200_LIKE.name]


def rack_max_power_w(nameplate_gpus: int) -> int:
    """The nameplate servers with their GPUs at the default limit, beside-GPU power included."""
    return round(nameplate_gpus * (H200_LIKE.default_limit_w + BESIDE.idle_w_per_gpu + BESIDE.load_w_per_gpu))


def gpu_budget_w(nameplate_gpus: int, gpus: int) -> int:
    """What the rack's maxPower leaves the GPUs with every one at its cap: the servers' idle floor
    is fixed, their load part rises load / 700 W per GPU W."""
    left_w = rack_max_power_w(nameplate_gpus) - gpus * BESIDE.idle_w_per_gpu
    return int(left_w / (1 + BESIDE.load_w_per_gpu / H200_LIKE.max_limit_w))


def rack_document(nameplate_gpus: int, gpus: int) -> dict[str, Any]:
    """The rack with ``gpus`` GPUs (``nameplate_gpus`` of them provisioned) and traffic in proportion."""
    max_power_w = rack_max_power_w(nameplate_gpus)
    return {
        "name": f"rack-density-{gpus}",
        "durationS": 600,
        "racks": [{"id": "rack-1", "maxPower": max_power_w}],
        "nodes": [{"name": "gpu", "count": gpus // GPUS_PER_NODE, "rack": "rack-1", "gpus": GPUS_PER_NODE,
                   "gpuModel": H200_LIKE.name}],
        "policies": [{
            "apiVersion": "powercapping.example.com/v1alpha1",
            "kind": "PowerCappingPolicy",
            "metadata": {"name": "code", "namespace": "inference"},
            "spec": {"powerCapLimit": gpu_budget_w(nameplate_gpus, gpus),
                     "rackConstraints": [{"rackId": "rack-1", "maxPower": max_power_w}]},
        }],
        "services": [{
            "name": "code", "namespace": "inference", "policy": "code", "replicas": gpus, "modelSizeB": MODEL_SIZE_B,
            "prefillShare": PREFILL_SHARE, "peakTokensS": PEAK_UTILISATION * gpus * tokens_per_gpu(),
            "dailyShape": "office", "podSkew": 0.4, "loadBound": 1.25, "maxQueueS": 20,
        }],
        "workload": {"dayStartHour": 6},
    }


def measure(nameplate_gpus: int, gpus: int, seed: int, settings: EngineSettings | None = None) -> dict[str, dict[str, float]]:
    """Per strategy: p99 latency proxy (s), seconds over maxPower, tokens/s, dropped %."""
    scenario = scenario_from_document(rack_document(nameplate_gpus, gpus)).with_overrides(seed=seed)
    summary, _ = run(scenario, STRATEGIES, settings)
    return {
        name: {
            "p99": figures["services"]["code"]["p99LatencyProxyS"] or 0.0,
            "over": float(figures["rackPowerViolationSeconds"]),
            "tokens": figures["tokensPerSecond"],
            "dropped": figures["droppedPercent"],
        }
        for name, figures in summary["strategies"].items()
    }


def holds(figures: dict[str, float], nameplate_p99_s: float) -> bool:
    return figures["over"] == 0 and figures["p99"] <= LATENCY_SLACK * nameplate_p99_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--gpus", type=int, default=32, help="nameplate GPUs (a multiple of 4)")
    parser.add_argument("--step", type=int, default=4, help="GPUs added per configuration (a multiple of 4)")
    parser.add_argument("--up-to", type=int, default=64, help="most GPUs tried")
    parser.add_argument("--no-marginal", action="store_true",
                        help="powercap without the marginal-value rebalancing (controller --no-marginal-rebalancing)")
    args = parser.parse_args(argv)
    settings = EngineSettings(allocation=AllocationSettings(marginal=MarginalSettings(enabled=False))) if args.no_marginal else None
    if args.gpus % GPUS_PER_NODE or args.step % GPUS_PER_NODE or args.step <= 0:
        parser.error(f"--gpus and --step must be positive multiples of {GPUS_PER_NODE} (GPUs per node)")
    nameplate_w = rack_max_power_w(args.gpus)
    print(f"Machine: {machine()}")
    print(f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {', '.join(map(str, args.seeds))}"
          + ("; powercap without the marginal-value rebalancing" if args.no_marginal else "") + "\n")
    print(f"One rack, maxPower {nameplate_w} W = {args.gpus} H200-like GPUs x {H200_LIKE.default_limit_w:.0f} W and their "
          f"servers beside them; GPU budget {gpu_budget_w(args.gpus, args.gpus)} W at the nameplate, "
          f"{gpu_budget_w(args.gpus, args.gpus) - gpu_budget_w(args.gpus, args.gpus + 1)} W less per GPU added; "
          f"traffic in proportion to the GPUs; holds = p99 latency proxy <= {LATENCY_SLACK:.2f} x the nameplate rack's "
          "(no capping) and 0 s over maxPower.\n")
    print("| GPUs | added | seed | " + " | ".join(f"{s.name}: p99 s, s over maxPower, dropped %" for s in STRATEGIES) + " |")
    print("| ---: | ---: | ---: | " + " | ".join("---" for _ in STRATEGIES) + " |")
    nameplate: dict[int, float] = {}
    failed: dict[str, int | None] = {s.name: None for s in STRATEGIES}
    for gpus in range(args.gpus, args.up_to + 1, args.step):
        for seed in args.seeds:
            figures = measure(args.gpus, gpus, seed, settings)
            if gpus == args.gpus:
                nameplate[seed] = figures[NO_CAPPING.name]["p99"]
            cells = []
            for strategy in STRATEGIES:
                one = figures[strategy.name]
                ok = holds(one, nameplate[seed])
                if not ok and failed[strategy.name] is None:
                    failed[strategy.name] = gpus
                cells.append(f"{one['p99']:.1f}, {one['over']:.0f}, {one['dropped']:.1f}{'' if ok else ' ✗'}")
            print(f"| {gpus} | {100 * (gpus - args.gpus) / args.gpus:+.0f} % | {seed} | " + " | ".join(cells) + " |", flush=True)
        if all(v is not None for v in failed.values()):
            break
    print("\nGPUs the rack holds, as a share added to the nameplate (the last configuration before the first that "
          "does not hold on some seed):\n")
    print("| strategy | GPUs held | added |")
    print("| --- | ---: | ---: |")
    for strategy in STRATEGIES:
        first_failure = failed[strategy.name]
        held = (first_failure - args.step) if first_failure is not None else None
        if held is None:
            print(f"| {strategy.name} | >= {args.up_to} | >= {100 * (args.up_to - args.gpus) / args.gpus:+.0f} % |")
        elif held < args.gpus:
            print(f"| {strategy.name} | none | the nameplate rack itself does not hold |")
        else:
            print(f"| {strategy.name} | {held} | {100 * (held - args.gpus) / args.gpus:+.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
