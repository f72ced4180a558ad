"""The simulator's figures pinned: speed work on the engine, the physics or the allocation must
not move them beyond float noise.

The figures were computed by the engine before it was vectorised (commit 69be3b6): the
built-in scenario over 330 simulated seconds (the 270 s burst and the 300 s cap cut
included), every strategy and the oracle. powercap's moved when racks began counting what
their nodes draw beside the GPUs (#16: the built-in scenario's maxPower and cooling were
rescaled for it, and the controller's rack fill and the extender count it), and again when
the allocation's defaults became the whole powerCapLimit (no 3 % margin) and the
marginal-value rebalancing on (#14), and when the extender began counting a starting GPU
at the largest minimum seen (batch's energy, 0.08 %), and when marginal values within
30 % of their median began to count as equal, and when the deadband began to keep or move
a service's caps together (keeping some previous caps had left up to 3 % of batch's budget
unspent), and when the surplus began to go to the pinned GPUs first and an agent that
raised a cap began to publish it at its limit before the write, and when a starting GPU
began to count at its own node's minimum and the agents to publish before the first pods
are placed, and when a pod's queue began to count as pinned and raises to follow the
lowers they wait on, and when a queue began to take the surplus first and to bring the
controller's next round forward (with a rack's raises keeping room for the limiter's
overshoot); the baselines' and the
oracle's did not (they never read rack power or the allocation), and the energy beside the
GPUs is pinned since.
"""

from __future__ import annotations

import math

import pytest

from powercap.simulation.engine import NO_CAPPING, ORACLE, POWERCAP, STATIC_SPLIT, SimulationResult, simulate
from powercap.simulation.scenario import default_scenario_text, load_scenario
from powercap.simulation.summary import summarize

PINNED_DURATION_S = 330.0
RELATIVE_TOLERANCE = 1e-9

# strategy -> service -> (generated tokens, GPU energy J, p99 latency proxy s as summary.json rounds it)
PINNED_SERVICES: dict[str, dict[str, tuple[float, float, float]]] = {
    "no-capping": {
        "chat": (7166291.190205674, 1960473.0660767371, 10.537),
        "code": (5747342.493534008, 1402155.1952424312, 6.141),
        "batch": (20722084.639650036, 746471.5066348277, 15.402),
    },
    "static-split": {
        "chat": (6834363.862117242, 1467826.584997941, 34.996),
        "code": (5381611.282084165, 1035948.221455519, 22.681),
        "batch": (19572460.931686096, 536563.289428508, 39.417),
    },
    "powercap": {
        "chat": (7166291.190205646, 1612032.925331996, 25.783),
        "code": (5726568.858618396, 1119867.810663611, 22.316),
        "batch": (20098579.881034654, 524957.7173373988, 27.114),
    },
    "oracle": {
        "chat": (7166291.1902056495, 1618266.4505797469, 23.564),
        "code": (5747342.493533995, 1126391.4594360958, 21.76),
        "batch": (20189379.65974942, 555321.0888667986, 27.356),
    },
}
# strategy -> the sum of every GPU's energy counter at the end, J
PINNED_COUNTER_ENERGY_J = {
    "no-capping": 4320416.767953997,
    "static-split": 3251655.095881968,
    "powercap": 3468175.453333006,
    "oracle": 3511295.998882641,
}
# strategy -> what the nodes drew beside their GPUs over the run, J
PINNED_NON_GPU_ENERGY_J = {
    "no-capping": 4165923.3702003225,
    "static-split": 3902956.4056075877,
    "powercap": 3961257.303199536,
    "oracle": 3969833.991452781,
}


@pytest.fixture(scope="module")
def pinned_run() -> SimulationResult:
    scenario = load_scenario(default_scenario_text(), duration_s=PINNED_DURATION_S)
    return simulate(scenario, (NO_CAPPING, STATIC_SPLIT, POWERCAP, ORACLE))


@pytest.mark.parametrize("strategy", list(PINNED_SERVICES))
def test_every_service_serves_and_draws_what_it_did_before(pinned_run: SimulationResult, strategy: str) -> None:
    run = next(run for run in pinned_run.runs if run.strategy.name == strategy)
    recorder = run.recorder
    services = summarize(pinned_run)["strategies"][strategy]["services"]
    for index, name in enumerate(recorder.services):
        tokens, energy_j, p99_s = PINNED_SERVICES[strategy][name]
        assert math.fsum(recorder.service_tokens[index]) == pytest.approx(tokens, rel=RELATIVE_TOLERANCE), name
        assert math.fsum(recorder.service_energy_j[index]) == pytest.approx(energy_j, rel=RELATIVE_TOLERANCE), name
        assert services[name]["p99LatencyProxyS"] == pytest.approx(p99_s, abs=1e-3), name
    assert run.counter_energy_j == pytest.approx(PINNED_COUNTER_ENERGY_J[strategy], rel=RELATIVE_TOLERANCE)
    assert math.fsum(recorder.non_gpu_energy_j) == pytest.approx(PINNED_NON_GPU_ENERGY_J[strategy], rel=RELATIVE_TOLERANCE)
