"""The simulation engine: the whole system in simulated time, one strategy at a time.

Per physics step of ``stepS`` seconds, in this order:

1. **events** due (cap changes edit the policy object; scaling creates or deletes pods);
2. **node agents** whose tick is due (every ``agentIntervalS``, each node with its own
   phase): read the GPUs and their pods, plan each cap
   (:func:`powercap.agentplan.plan_tick`, which runs the control law), set it, publish the
   telemetry annotation when the publisher's rate limits allow;
3. **budget controller** (powercap only) every ``controllerIntervalS``, and at once after
   a policy change (a watch event): cluster view -> :func:`powercap.budget.plan_round` ->
   each changed policy status written (its ``allocations`` are the agents' ceilings) ->
   :func:`powercap.rebalance.plan_rebalance` for energy-aware policies (an eviction
   re-creates the pod, which the scheduler places again);
4. **scheduler**: pending pods are placed one after the other, ``SCHEDULING_LATENCY_S``
   apart (as many as fit in the step; the others wait for the next step, after its agent
   ticks), each on a fresh cluster view, so the extender sees the pods bound just before
   it through assumed power; pods that fit nowhere retry after ``SCHEDULER_RETRY_S``;
5. **traffic**: each service's offered tokens/s (the trace) is split over its serving
   pods (:mod:`powercap.simulation.workload`); a pod's GPUs get the load
   ``u = min(1, (offered + backlog / dt) / uncapped tokens/s)`` (a pod with a queue runs
   flat out);
6. **physics**: every GPU advances with :func:`powercap.physics.advance` under its cap and
   its rack's inlet (all GPUs at once, on arrays:
   :meth:`~powercap.simulation.world.GpuArrays.advance`); pods are credited with the tokens
   generated; queues grow by ``offered x dt - served`` and requests waiting longer than
   ``maxQueueS`` are dropped; each node draws beside its GPUs an idle floor plus a part
   following their power (:meth:`~powercap.simulation.world.World.non_gpu_power_w`);
   racks sum their nodes' whole power and their inlet follows it
   (:mod:`powercap.simulation.world`).

Strategies: ``no-capping`` (kube-scheduler spreading, GPUs at their default limit),
``static-split`` (same placement, each GPU of a policy's service capped at
``powerCapLimit / its GPUs``) and ``powercap`` (extender placement, controller budgets,
agent control law). Each strategy runs on its own copy of the world, with the same trace.
``oracle`` (not run by default) is a bound, not a controller: same placement as the
baselines, each policy's cap re-split at every whole second to maximise tokens/s knowing
every GPU's load (:func:`~powercap.simulation.decisions.oracle_split_w`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

import numpy as np

from powercap import physics
from powercap.agentplan import (
    CapRecord, GpuMemory, GpuPlan, PublishSettings, TickInputs, build_telemetry, lowers_to_publish_now, plan_tick, queue_formed,
    raised_caps, should_publish,
)
from powercap.algorithms import AlgorithmRegistry, EnergyAwareScheduling
from powercap.allocation import AllocationSettings
from powercap.budget import FOLLOW_UP_S, QUEUE_ROUND_S, plan_round
from powercap.cluster import ClusterView
from powercap.control import ControlSettings
from powercap.nodepower import REDFISH, SourceReading, choose_node_power
from powercap.objects import policy_for_pod
from powercap.policies import Policy, parse_policy
from powercap.rebalance import plan_rebalance
from powercap.simulation import decisions
from powercap.simulation.metrics import LATENCY_PERCENTILE, Recorder, weighted_percentile_of
from powercap.simulation.scenario import CapChange, Scale, Scenario, Service
from powercap.simulation.workload import WorkloadTrace, bounded_shares, build_trace, pod_weight
from powercap.simulation.world import ModelColumns, SimGpu, SimNode, SimPod, World, moment, operating_points, thermal_caps_w

NODE_POWER_MAX_AGE_S = 15.0
"""The agent's ``--node-power-max-age`` default (a reading older is not used)."""
TOKENS_PER_REQUEST = 211.0
"""Mean generated tokens per request of the recorded Azure LLM conversation hour
(``../shared/data/azure-llm-2023``): a pod's backlog in requests, for vLLM's ``num_requests_waiting``."""
SCHEDULING_LATENCY_S = 0.005
"""Time kube-scheduler spends per pod (filter, score, bind)."""
SCHEDULER_RETRY_S = 1.0
"""Back-off before an unschedulable pod is tried again."""
_EPSILON_S = 1e-9

ProgressCallback = Callable[[str, float], None]
"""Called with (strategy name, fraction of its run done, 0..1)."""


@dataclass(frozen=True)
class Strategy:
    """How pods are placed and GPUs capped.

    ``placement``: ``default`` (kube-scheduler spreading) or ``extender`` (with the
    power-aware extender). ``capping``: ``none``, ``static``, ``powercap`` or ``oracle``.
    ``assumed_power``: whether the extender's view counts pods bound since the last
    telemetry (False hides those binds from it, an extender without assumed-power accounting).
    """

    name: str
    placement: str
    capping: str
    description: str
    assumed_power: bool = True


NO_CAPPING = Strategy("no-capping", "default", "none", "kube-scheduler spreading; GPUs at their default limit")
STATIC_SPLIT = Strategy("static-split", "default", "static", "kube-scheduler spreading; each GPU capped at powerCapLimit / GPUs")
POWERCAP = Strategy("powercap", "extender", "powercap", "extender placement, controller budgets, agent control law")
STRATEGIES: tuple[Strategy, ...] = (NO_CAPPING, STATIC_SPLIT, POWERCAP)
ORACLE = Strategy(
    "oracle", "default", "oracle",
    "kube-scheduler spreading; each cap re-split every second for the most tokens/s, knowing every GPU's load (a bound)",
)
"""Not one of :data:`STRATEGIES`: the best any split of the caps could do (benchmarks/simulator.py)."""


@dataclass(frozen=True)
class EngineSettings:
    """Tuning of the services as the simulator runs them (their own defaults)."""

    control: ControlSettings = field(default_factory=ControlSettings)
    allocation: AllocationSettings = field(default_factory=AllocationSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)


@dataclass
class StrategyRun:
    """The record of one strategy's run."""

    strategy: Strategy
    recorder: Recorder
    unschedulable: dict[str, str]  # pod -> why, for pods still pending at the end
    placements: dict[str, str]  # pod -> node, as first placed
    cap_changes: list[tuple[float, str, int]]  # (at_s, policy key, W)
    evictions: list[tuple[float, str, str]] = field(default_factory=list)  # (at_s, pod, node)
    counter_energy_j: float = 0.0  # sum of the GPUs' energy counters at the end (NVML total energy)
    wall_s: float = 0.0
    statuses: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # policy key -> last status written


@dataclass
class SimulationResult:
    scenario: Scenario
    trace: WorkloadTrace
    runs: list[StrategyRun]


def simulate(
    scenario: Scenario,
    strategies: Sequence[Strategy] = STRATEGIES,
    settings: EngineSettings | None = None,
    registry: AlgorithmRegistry | None = None,
    progress: ProgressCallback | None = None,
    clock: Callable[[], float] | None = None,
) -> SimulationResult:
    """Run every strategy on the scenario (same trace for all) and return their records.

    ``clock`` (e.g. ``time.perf_counter``) only measures each run's wall time.
    """
    settings = settings or EngineSettings()
    registry = registry or AlgorithmRegistry.default()
    trace = build_trace(scenario)
    runs = []
    for strategy in strategies:
        started = clock() if clock else 0.0
        run = _Run(scenario, trace, strategy, settings, registry, progress).run()
        run.wall_s = (clock() - started) if clock else 0.0
        runs.append(run)
    return SimulationResult(scenario=scenario, trace=trace, runs=runs)


class _Run:
    """One strategy's pass over the scenario (see the module docstring for the step order)."""

    def __init__(
        self,
        scenario: Scenario,
        trace: WorkloadTrace,
        strategy: Strategy,
        settings: EngineSettings,
        registry: AlgorithmRegistry,
        progress: ProgressCallback | None,
    ) -> None:
        self.scenario = scenario
        self.trace = trace
        self.strategy = strategy
        self.settings = settings
        self.registry = registry
        self.progress = progress
        self.step_s = scenario.step_s
        self.timing = scenario.timing
        policies = {p.key: p for p in (parse_policy(doc, registry) for doc in scenario.policies)}
        self.world = World.build(scenario, policies)
        self.service_index = {s.name: i for i, s in enumerate(scenario.services)}
        self.rack_index = {r.rack_id: i for i, r in enumerate(scenario.racks)}
        seconds = int(math.ceil(scenario.duration_s))
        self.recorder = Recorder(
            seconds=seconds,
            step_s=self.step_s,
            services=tuple(s.name for s in scenario.services),
            racks=tuple(r.rack_id for r in scenario.racks),
        )
        self.rng = random.Random(f"powercap-scheduler:{scenario.seed}:{strategy.name}")
        # Agents start at different moments: node i ticks at phase i / n of the interval.
        count = len(self.world.nodes)
        interval = self.timing.agent_interval_s
        self.agent_due = [(self._on_step(interval * i / count), i) for i in range(count)]  # a heap
        heapq.heapify(self.agent_due)
        self.node_gpu_slots = [np.array([gpu.slot for gpu in node.gpus], dtype=np.int64) for node in self.world.nodes]
        self.policies_version = 0  # counts policy writes: what depends on the policies is recomputed after one
        self.fixed_caps: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self.policy_gpus: tuple[int, dict[str, int]] | None = None
        self.oracle_gpus: tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None
        self.layout: _Layout | None = None
        self.second_sums = _SecondSums(len(scenario.services), len(scenario.racks))
        self.controller_due = 0.0
        self.last_round_s = -math.inf
        self.policies_changed = False
        self.scheduler = scenario.scheduler
        self.view: ClusterView | None = None
        self.lagging: dict[str, frozenset[str]] = {}
        # Per node, as each agent holds them: its memory of each GPU, its state file's records.
        self.memories: dict[str, dict[str, GpuMemory]] = {node.name: {} for node in self.world.nodes}
        self.records: dict[str, dict[str, CapRecord]] = {node.name: {} for node in self.world.nodes}
        self.policy_list: tuple[int, list[Policy]] | None = None  # (policies_version, the parsed policies)
        self.node_pods: dict[int, tuple[int, list[SimPod], dict[str, frozenset[str]]]] = {}  # see _pods_on
        self.last_plans: dict[str, tuple[GpuPlan, ...]] = {}  # per node, its agent's last plans (for its telemetry)
        self.published_at: dict[str, float] = {}
        self.last_move: dict[str, datetime] = {}
        self.evictions: list[tuple[float, str, str]] = []
        self.pod_policy: dict[str, str | None] = {}
        self.placements: dict[str, str] = {}
        self.unschedulable: dict[str, str] = {}
        self.cap_changes: list[tuple[float, str, int]] = []
        self.events = list(scenario.events)
        self.uncapped_speed: dict[tuple[str, float], float] = {}
        self.shares: dict[str, tuple[tuple[str, ...], list[float]]] = {}
        for service in scenario.services:
            self._scale(service, service.replicas, 0.0)

    def _on_step(self, t_s: float) -> float:
        return round(t_s / self.step_s) * self.step_s

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> StrategyRun:
        steps = int(round(self.scenario.duration_s / self.step_s))
        steps_per_second = int(round(1.0 / self.step_s))
        # The node agents (a DaemonSet) run before the scenario's pods are created: each has
        # ticked and published once at 0 s, whatever its phase, so that the extender places
        # the first pods on telemetry as it would in a running cluster.
        for due_s, index in sorted(self.agent_due):
            if due_s > 0:
                self._agent_tick(index, 0.0)
        report_every = max(1, steps // 200)
        for step in range(steps):
            t_s = step * self.step_s
            self._apply_events(t_s)
            self._agent_ticks(t_s)
            if self.strategy.capping == "powercap" and (t_s >= self.controller_due - _EPSILON_S or self.policies_changed):
                self._controller_round(t_s)
            if self.world.pending:
                self._schedule(t_s)
            second = step // steps_per_second
            if self.strategy.capping == "oracle" and step % steps_per_second == 0:
                self._oracle_caps()
            if step % steps_per_second == 0:
                self._sample_latency(second, t_s)
            self._physics(t_s, second)
            if step % steps_per_second == steps_per_second - 1:
                self._end_of_second(second)
            if self.progress is not None and (step % report_every == 0 or step == steps - 1):
                self.progress(self.strategy.name, (step + 1) / steps)
        if steps % steps_per_second:
            self.second_sums.add_to(self.recorder, (steps - 1) // steps_per_second)
        unschedulable = {pod.key: self.unschedulable.get(pod.key, "pending") for pod in self.world.pending}
        return StrategyRun(
            self.strategy, self.recorder, unschedulable, self.placements, self.cap_changes, self.evictions,
            counter_energy_j=math.fsum(self.world.gpu_arrays.energy_j.tolist()),
            statuses={key: document["status"] for key, document in self.world.policies.items() if "status" in document},
        )

    # -- 1. events -----------------------------------------------------------------------
    def _apply_events(self, t_s: float) -> None:
        while self.events and self.events[0].at_s <= t_s + _EPSILON_S:
            event = self.events.pop(0)
            if isinstance(event, CapChange):
                self._change_cap(event, t_s)
            elif isinstance(event, Scale):
                self._scale(self.scenario.service(event.service), event.replicas, t_s)

    def _change_cap(self, event: CapChange, t_s: float) -> None:
        document = self.world.policies[event.policy_key]
        metadata = dict(document.get("metadata") or {})
        metadata["generation"] = int(metadata.get("generation", 1)) + 1
        spec = dict(document["spec"])
        spec["powerCapLimit"] = event.power_cap_w
        updated = {**document, "metadata": metadata, "spec": spec}
        self.world.policies[event.policy_key] = updated
        self.world.parsed_policies[event.policy_key] = parse_policy(updated, self.registry)
        self.policies_version += 1
        self.policies_changed = True
        self.cap_changes.append((t_s, event.policy_key, event.power_cap_w))

    def _scale(self, service: Service, replicas: int, t_s: float) -> None:
        current = sorted(
            (pod for pod in self.world.pods.values() if pod.service is service), key=lambda p: p.index
        )
        for pod in current[replicas:]:
            pod.unbind()
            del self.world.pods[pod.key]
            if pod in self.world.pending:
                self.world.pending.remove(pod)
        for _ in range(replicas - len(current)):
            self._create_pod(service, t_s)

    def _create_pod(self, service: Service, t_s: float) -> None:
        """A new pending pod of the service (its ReplicaSet creating one)."""
        index = self.world.next_pod_index.get(service.name, 0)
        self.world.next_pod_index[service.name] = index + 1
        pod = SimPod(
            name=f"{service.name}-{index}",
            index=index,
            service=service,
            weight=pod_weight(self.scenario.seed, service, index),
            created_s=t_s,
            service_index=self.service_index[service.name],
            arrays=self.world.pod_arrays,
        )
        policy = policy_for_pod(pod.api_object(t_s, self.timing.pod_startup_s), self.world.parsed_policies.values())
        self.pod_policy[pod.key] = policy.key if policy is not None else None
        self.world.pods[pod.key] = pod
        self.world.pending.append(pod)

    def policy_of(self, pod: SimPod) -> Policy | None:
        key = self.pod_policy.get(pod.key)
        return self.world.parsed_policies.get(key) if key is not None else None

    # -- 2. node agents --------------------------------------------------------------------
    def _agent_ticks(self, t_s: float) -> None:
        due: list[int] = []
        while self.agent_due and t_s >= self.agent_due[0][0] - _EPSILON_S:
            due_s, index = heapq.heappop(self.agent_due)
            due.append(index)
            heapq.heappush(self.agent_due, (due_s + self.timing.agent_interval_s, index))
        if not due:
            return
        due.sort()
        if self.strategy.capping == "powercap" or self.strategy.placement == "extender":
            for index in due:
                self._agent_tick(index, t_s)
        else:
            slots = self.node_gpu_slots[due[0]] if len(due) == 1 else np.concatenate([self.node_gpu_slots[i] for i in due])
            self._fixed_caps_tick(slots)

    def _agent_tick(self, node_index: int, t_s: float) -> None:
        """One tick of the node's agent (powercap) or of the operator's fixed caps (baselines).

        powercap: what ``nodeagent.agent.Agent.tick`` does: read the GPUs and their pods,
        :func:`~powercap.agentplan.plan_tick`, write each SET/RESTORE (NVML takes mW), keep
        the records and memories, then :func:`~powercap.agentplan.build_telemetry` and
        publish it when :func:`~powercap.agentplan.should_publish` says so.
        """
        node = self.world.nodes[node_index]
        if self.strategy.capping == "powercap":
            self._plan_tick(node, t_s)
        else:
            self._fixed_caps_tick(self.node_gpu_slots[node_index])
        self._publish(node, t_s)
        for pod in self._pods_on(node)[0]:
            pod.tick_served_tokens, pod.tick_s = pod.served_tokens, t_s

    def _pods_on(self, node: SimNode) -> tuple[list[SimPod], dict[str, frozenset[str]]]:
        """The node's pods (in GPU order) and the UIDs of the pod on each of its GPUs; rebuilt
        after a pod binds or unbinds anywhere."""
        layout_changes = self.world.pod_arrays.layout_changes
        cached = self.node_pods.get(node.index)
        if cached is None or cached[0] != layout_changes:
            pods = list({gpu.pod.key: gpu.pod for gpu in node.gpus if gpu.pod is not None}.values())
            uids = {gpu.uuid: frozenset({gpu.pod.uid}) if gpu.pod is not None else frozenset() for gpu in node.gpus}
            cached = self.node_pods[node.index] = (layout_changes, pods, uids)
        return cached[1], cached[2]

    def _policies(self) -> list[Policy]:
        """The parsed policies as the agents list them; a new list after a policy write."""
        if self.policy_list is None or self.policy_list[0] != self.policies_version:
            self.policy_list = (self.policies_version, list(self.world.parsed_policies.values()))
        return self.policy_list[1]

    def _fixed_caps_tick(self, gpu_slots: np.ndarray) -> None:
        """The baselines' ticks on these GPUs: the caps of :meth:`_fixed_caps`, where they set one."""
        caps_w, sets = self._fixed_caps()
        chosen = gpu_slots[sets[gpu_slots]]
        self.world.gpu_arrays.cap_w[chosen] = caps_w[chosen]

    def _fixed_caps(self) -> tuple[np.ndarray, np.ndarray]:
        """Each GPU's cap under the baseline (``static``: an enforced policy's GPUs at
        :func:`~powercap.simulation.decisions.static_split_w`; ``oracle``: those left to
        :meth:`_oracle_caps`, every whole second; every other GPU at its default limit), and
        whether a tick sets it; recomputed when pods or policies change."""
        key = (self.world.pod_arrays.layout_changes, self.policies_version)
        if self.fixed_caps is None or self.fixed_caps[0] != key:
            capping = self.strategy.capping
            caps_w = np.empty(len(self.world.gpus))
            sets = np.ones(len(self.world.gpus), dtype=bool)
            for gpu in self.world.gpus:
                policy = self.policy_of(gpu.pod) if gpu.pod is not None else None
                if capping == "static" and policy is not None and policy.enforced:
                    service_gpus = self._policy_gpus(policy.key)
                    caps_w[gpu.slot] = decisions.static_split_w(policy, service_gpus, gpu.model.min_limit_w, gpu.model.max_limit_w)
                elif capping == "oracle" and policy is not None and policy.enforced:
                    sets[gpu.slot] = False
                else:
                    caps_w[gpu.slot] = gpu.model.default_limit_w
            self.fixed_caps = (key, caps_w, sets)
        return self.fixed_caps[1], self.fixed_caps[2]

    def _plan_tick(self, node: SimNode, t_s: float) -> None:
        startup_s = self.timing.pod_startup_s
        node_pods, pod_uids_by_gpu = self._pods_on(node)
        pods = {pod.uid: pod for pod in node_pods}
        tokens_s = {
            uid: (pod.served_tokens - pod.tick_served_tokens) / (t_s - pod.tick_s)
            for uid, pod in pods.items()
            if pod.serving(t_s, startup_s) and pod.tick_s is not None and t_s > pod.tick_s
        }
        plans = plan_tick(TickInputs(
            node=node.name,
            now_s=t_s,
            readings=node.gpus,
            pod_uids_by_gpu=pod_uids_by_gpu,
            pods_by_uid={uid: pod.api_object(t_s, startup_s) for uid, pod in pods.items()},
            policies=self._policies(),
            node_rack=node.rack.spec.rack_id,
            inlet_c=node.rack.inlet_c,
            tokens_s_by_pod=tokens_s,
            memories=self.memories[node.name],
            records=self.records[node.name],
            settings=self.settings.control,
        ))
        memories, records = self.memories[node.name], self.records[node.name]
        for plan in plans:
            if plan.memory is not None:
                memories[plan.uuid] = plan.memory
            else:
                memories.pop(plan.uuid, None)
            if plan.record is not None:
                records[plan.uuid] = plan.record
            else:
                records.pop(plan.uuid, None)
            if plan.writes:
                gpu = next(gpu for gpu in node.gpus if gpu.uuid == plan.uuid)
                gpu.cap_w = round(physics.clamp_limit_w(gpu.model, plan.cap_w) * 1000) / 1000
        self.last_plans[node.name] = plans

    def _publish(self, node: SimNode, t_s: float) -> None:
        """The telemetry, rate limited as the agent's publisher does; its ``nodePower`` is
        the node's whole power (its GPUs and what it draws beside them at the last physics
        step) read as a BMC reading taken now, chosen as the agent chooses
        (:func:`powercap.nodepower.choose_node_power`)."""
        last_s = self.published_at.get(node.name)
        plans = self.last_plans.get(node.name)
        lowered = plans is not None and lowers_to_publish_now(plans)
        requests_waiting_by_gpu = self._requests_waiting(node, t_s) if plans is not None else None
        if (node.telemetry is not None and last_s is not None and t_s - last_s < self.settings.publish.min_interval_s
                and not lowered and not queue_formed(node.telemetry, (requests_waiting_by_gpu or {}).values())):
            return  # should_publish would refuse whatever the telemetry: not built
        tokens_s_by_gpu: dict[str, float | None] | None = None
        if plans is not None:
            pods = {plan.uuid: plan.pod for plan in plans}
            tokens_s_by_gpu = {plan.uuid: plan.tokens_s for plan in plans}
        else:  # no agent plan on this node: the pods the GPUs hold
            pods = {gpu.uuid: gpu.pod.key if gpu.pod is not None else None for gpu in node.gpus}
        gpu_power_w = sum(gpu.power_w for gpu in node.gpus)
        whole_w = gpu_power_w + float(self.world.node_non_gpu_w[node.index])
        node_power = choose_node_power(
            [SourceReading(REDFISH, whole_w, t_s)], t_s, max_age_s=NODE_POWER_MAX_AGE_S, gpu_power_w=gpu_power_w, overhead_w=0.0,
        ).power
        # a GPU this tick raised at its limit before the write, as the agent publishes it
        raised = raised_caps(plans) if plans is not None else None
        telemetry = build_telemetry(
            moment(t_s), node.gpus, node.rack.inlet_c, pods, raised,
            tokens_s_by_gpu=tokens_s_by_gpu, node_power=node_power, requests_waiting_by_gpu=requests_waiting_by_gpu,
            raised_to_w_by_gpu={p.uuid: p.cap_w for p in plans if p.uuid in raised} if plans and raised else None,
        )
        since_s = t_s - last_s if last_s is not None else math.inf
        if should_publish(node.telemetry, telemetry, since_s, self.settings.publish, lowered):
            if queue_formed(node.telemetry, (gpu.requests_waiting for gpu in telemetry.gpus)):
                # the controller's watch sees it: its next round QUEUE_ROUND_S after the last
                self.controller_due = min(self.controller_due, max(t_s, self.last_round_s + QUEUE_ROUND_S))
            node.set_telemetry(telemetry)
            self.published_at[node.name] = t_s

    def _requests_waiting(self, node: SimNode, t_s: float) -> dict[str, int | None]:
        """vLLM's ``num_requests_waiting`` of each serving pod, as its agent scrapes it: the
        whole requests of ``TOKENS_PER_REQUEST`` in its backlog (the traffic its GPUs could not
        serve yet; less than one request's tokens is work in flight, not a request waiting)."""
        startup_s, backlog = self.timing.pod_startup_s, self.world.pod_arrays.backlog_tokens
        waiting: dict[str, int | None] = {}
        for gpu in node.gpus:
            pod = gpu.pod
            if pod is not None and pod.serving(t_s, startup_s):
                waiting[gpu.uuid] = int(float(backlog[pod.slot]) // TOKENS_PER_REQUEST)
        return waiting

    def _oracle_caps(self) -> None:
        """The oracle bound: each enforced policy's cap split for the most tokens/s at the loads now."""
        gpus = self.world.gpu_arrays
        for key, (slots, tokens_scale) in self._gpus_by_policy().items():
            policy = self.world.parsed_policies.get(key)
            if policy is None or not policy.enforced:
                continue
            gpus.cap_w[slots] = decisions.oracle_split_arrays_w(
                gpus.distinct_models, gpus.model_index[slots], gpus.load[slots], gpus.prefill_share[slots], tokens_scale,
                policy.power_cap_w,
            )

    def _gpus_by_policy(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per policy, the GPUs of its bound pods and their services' tokens scale."""
        layout_changes = self.world.pod_arrays.layout_changes
        if self.oracle_gpus is None or self.oracle_gpus[0] != layout_changes:
            by_policy: dict[str, list[SimGpu]] = {}
            for pod in self.world.pods.values():
                key = self.pod_policy.get(pod.key)
                if pod.node is not None and key is not None:
                    by_policy.setdefault(key, []).extend(pod.gpus)
            self.oracle_gpus = (layout_changes, {
                key: (
                    np.array([gpu.slot for gpu in gpus], dtype=np.int64),
                    np.array([gpu.pod.service.tokens_scale if gpu.pod is not None else 1.0 for gpu in gpus]),
                )
                for key, gpus in by_policy.items()
            })
        return self.oracle_gpus[1]

    def _policy_gpus(self, policy_key: str) -> int:
        """GPUs of the bound pods under the policy."""
        layout_changes = self.world.pod_arrays.layout_changes
        if self.policy_gpus is None or self.policy_gpus[0] != layout_changes:
            counts: dict[str, int] = {}
            for pod in self.world.pods.values():
                key = self.pod_policy.get(pod.key)
                if pod.node is not None and key is not None:
                    counts[key] = counts.get(key, 0) + len(pod.gpus)
            self.policy_gpus = (layout_changes, counts)
        return self.policy_gpus[1].get(policy_key, 0)

    # -- 3. budget controller ----------------------------------------------------------------
    def _controller_round(self, t_s: float) -> None:
        """What ``powercap controller`` does each round: plan, write changed statuses, rebalance."""
        self.last_round_s = t_s
        view = self._view(t_s)
        plan = plan_round(view, self.settings.allocation, lagging_before=self.lagging)
        self.lagging = {key: policy_plan.lagging for key, policy_plan in plan.policies.items()}
        for key, policy_plan in plan.policies.items():
            if policy_plan.changed:
                self._write_status(key, policy_plan.status)
        interval_s = self.timing.controller_interval_s
        self.controller_due = t_s + (min(FOLLOW_UP_S, interval_s) if plan.follow_up else interval_s)
        self.policies_changed = False
        for key, policy_view in sorted(view.policies.items()):
            if policy_view.policy.algorithm.name != EnergyAwareScheduling.name:
                continue
            decision = plan_rebalance(
                policy_view, view, self._pod_objects(t_s), [node.api_object() for node in self.world.nodes],
                self.last_move.get(key, moment(0.0)),
            )
            if decision.move is not None:
                self._evict(decision.move.pod, t_s)
                self.last_move[key] = moment(t_s)
                self.evictions.append((t_s, decision.move.pod, decision.move.node))

    def _write_status(self, key: str, status: Mapping[str, Any]) -> None:
        """The controller's write through /status; agents read ``status.allocations`` from it."""
        document = {**self.world.policies[key], "status": status}
        self.world.policies[key] = document
        # Only the status changed: parse_policy would give the policy parsed before with this
        # status (validation ignores the status and the CRD defaults nothing in it), after a
        # deep copy of 1,250 allocations per write at 10,000 GPUs.
        self.world.parsed_policies[key] = replace(self.world.parsed_policies[key], status=MappingProxyType(dict(status)))
        self.policies_version += 1

    def _evict(self, pod_key: str, t_s: float) -> None:
        """An eviction: the pod goes away and its ReplicaSet creates a replacement at once."""
        pod = self.world.pods.pop(pod_key)
        pod.unbind()
        self._create_pod(pod.service, t_s)

    def _pod_objects(self, t_s: float, hide_unreported: bool = False) -> list[dict[str, Any]]:
        """Every active pod as the API serves it; ``hide_unreported`` shows pods bound since
        their node's last telemetry as still pending (a view blind to recent binds)."""
        startup_s = self.timing.pod_startup_s
        pods: list[dict[str, Any]] = []
        for pod in self.world.pods.values():
            if hide_unreported and pod.node is not None and not _reported(pod):
                pods.append(pod.service.pod_object(pod.name))
            else:
                pods.append(pod.api_object(t_s, startup_s))
        return pods

    def _view(self, t_s: float, hide_unreported: bool = False) -> ClusterView:
        self.view = decisions.cluster_view(
            [node.api_object() for node in self.world.nodes],
            self._pod_objects(t_s, hide_unreported),
            list(self.world.policies.values()),
            moment(t_s),
            self.registry,
            self.view,
        )
        return self.view

    # -- 4. scheduler --------------------------------------------------------------------------
    def _schedule(self, t_s: float) -> None:
        """Place the pending pods whose turn it is, ``SCHEDULING_LATENCY_S`` apart (at most
        one step's worth: the rest wait for the next step, after that step's agent ticks)."""
        due = [pod for pod in self.world.pending if pod.next_attempt_s <= t_s + _EPSILON_S]
        budget = max(1, int(self.step_s / SCHEDULING_LATENCY_S + 1e-9))
        for attempt, pod in enumerate(due[:budget]):
            bind_s = t_s + attempt * SCHEDULING_LATENCY_S
            candidates = self._candidates(pod.service)
            if self.strategy.placement == "extender":
                view = self._view(bind_s, hide_unreported=not self.strategy.assumed_power)
                placement = decisions.place_with_extender(
                    view, pod.api_object(bind_s, self.timing.pod_startup_s), candidates, self.registry, self.rng,
                    self.scheduler.gpu_scoring, self.scheduler.extender_weight,
                )
            else:
                placement = decisions.place_default(pod.service.gpus_per_pod, candidates, self.rng, self.scheduler.gpu_scoring)
            if placement.node is None:
                pod.next_attempt_s = t_s + SCHEDULER_RETRY_S
                reasons = sorted(set(placement.failed.values()))
                self.unschedulable[pod.key] = reasons[0] if reasons else "no node has enough free GPUs"
                pod.refuse(decisions.fit_error(len(self.world.nodes), placement.failed))
                continue
            node = next(n for n in self.world.nodes if n.name == placement.node)
            pod.bind(node, bind_s)
            self.world.pending.remove(pod)
            self.placements.setdefault(pod.key, node.name)
            self.unschedulable.pop(pod.key, None)

    def _candidates(self, service: Service) -> list[decisions.Candidate]:
        models = service.gpu_models
        return [
            decisions.Candidate(node.name, node.free_gpu_count, len(node.gpus))
            for node in self.world.nodes
            if node.free_gpu_count >= service.gpus_per_pod and (models is None or node.gpu_model.name in models)
        ]

    # -- 5 and 6. traffic and physics --------------------------------------------------------
    def _physics(self, t_s: float, second: int) -> None:
        """Traffic, then every GPU advanced by :meth:`~powercap.simulation.world.GpuArrays.advance`
        (:func:`powercap.physics.advance` for all at once), the pods' queues, the racks' inlets."""
        dt_s = self.step_s
        layout = self._layout(t_s)
        sums = self.second_sums
        gpus, pods, racks = self.world.gpu_arrays, self.world.pod_arrays, self.world.rack_arrays
        offered_s = self._traffic(t_s, layout)
        energy_j, tokens = gpus.advance(racks.inlet_c[self.world.gpu_rack], dt_s)

        with_pod = layout.gpus_with_pod
        services = len(self.scenario.services)
        service_energy_j = np.bincount(layout.gpu_service, weights=energy_j[with_pod], minlength=services)
        sums.service_energy_j += service_energy_j
        np.maximum(sums.service_caps_sum_w, np.bincount(layout.gpu_service, weights=gpus.cap_w[with_pod], minlength=services), out=sums.service_caps_sum_w)
        for index, step_energy_j in enumerate(service_energy_j.tolist()):
            self.recorder.service_step_power_w[index].append(step_energy_j / dt_s)

        serving = layout.serving_slots
        if len(serving):
            pod_tokens = np.bincount(layout.gpu_pod_slot, weights=tokens[with_pod], minlength=pods.count)
            served = pod_tokens[serving] * layout.serving_tokens_scale
            pods.served_tokens[serving] += served
            rate = served / dt_s
            pods.rate_tokens_s[serving] = rate
            backlog = np.maximum(0.0, pods.backlog_tokens[serving] + offered_s * dt_s - served)
            limit = layout.serving_max_queue_s * rate
            over = backlog > limit
            sums.service_dropped_tokens += np.bincount(layout.serving_service[over], weights=(backlog - limit)[over], minlength=services)
            pods.backlog_tokens[serving] = np.where(over, limit, backlog)
            sums.service_tokens += np.bincount(layout.serving_service, weights=served, minlength=services)

        world = self.world
        world.node_non_gpu_w = world.non_gpu_power_w(energy_j / dt_s)
        non_gpu_energy_j = world.node_non_gpu_w * dt_s
        sums.non_gpu_energy_j += float(non_gpu_energy_j.sum())
        rack_energy_j = np.bincount(world.gpu_rack, weights=energy_j, minlength=len(racks.racks))
        rack_energy_j += np.bincount(world.node_rack, weights=non_gpu_energy_j, minlength=len(racks.racks))
        sums.rack_energy_j += rack_energy_j
        sums.cluster_energy_j += sum(rack_energy_j.tolist())
        racks.step_inlet(rack_energy_j / dt_s, dt_s)
        sums.rack_inlet_c_s += racks.inlet_c * dt_s

    def _traffic(self, t_s: float, layout: _Layout) -> np.ndarray:
        """Split each service's offered tokens/s over its serving pods and set their GPUs' load;
        returns the serving pods' offered tokens/s (in ``layout.serving_slots`` order).

        Pod shares by :func:`~powercap.simulation.workload.bounded_shares` (recomputed when
        the set of serving pods changes); load ``u = min(1, (offered + backlog / dt) / uncapped)``.
        """
        dt_s = self.step_s
        sums = self.second_sums
        offered_by_service = np.array([self.trace.offered_tokens_s(service.name, t_s) for service in self.scenario.services])
        sums.service_offered_tokens += offered_by_service * dt_s
        sums.service_dropped_tokens += np.where(layout.service_serves, 0.0, offered_by_service * dt_s)
        pods, gpus = self.world.pod_arrays, self.world.gpu_arrays
        serving = layout.serving_slots
        offered_s = offered_by_service[layout.serving_service] * layout.serving_shares
        pods.offered_tokens_s[serving] = offered_s
        load = np.minimum(1.0, (offered_s + pods.backlog_tokens[serving] / dt_s) / pods.uncapped_tokens_s[serving])
        gpus.load[layout.serving_gpus] = load[layout.serving_gpu_pod]
        gpus.prefill_share[layout.serving_gpus] = layout.serving_prefill_share[layout.serving_gpu_pod]
        return offered_s

    def _layout(self, t_s: float) -> _Layout:
        """Which GPUs serve which pods at ``t_s``; rebuilt when a pod binds, unbinds or starts serving."""
        layout = self.layout
        layout_changes = self.world.pod_arrays.layout_changes
        if layout is not None and layout.layout_changes == layout_changes and t_s < layout.next_serving_s - _EPSILON_S:
            return layout
        startup_s = self.timing.pod_startup_s
        by_service: list[list[SimPod]] = [[] for _ in self.scenario.services]
        next_serving_s = math.inf
        for pod in self.world.pods.values():
            if pod.node is None or pod.bound_s is None:
                continue
            if pod.serving(t_s, startup_s):
                by_service[pod.service_index].append(pod)
            else:
                next_serving_s = min(next_serving_s, pod.bound_s + startup_s)
        serving_pods = [pod for pods in by_service for pod in pods]
        shares = [share for service, pods in zip(self.scenario.services, by_service) if pods for share in self._shares(service, pods)]
        gpus = self.world.gpu_arrays
        gpus_with_pod = np.flatnonzero(gpus.pod_slot >= 0)
        serving_gpus = [gpu.slot for pod in serving_pods for gpu in pod.gpus]
        first_gpus = np.array([pod.gpus[0].slot for pod in serving_pods], dtype=np.int64)
        self.layout = layout = _Layout(
            layout_changes=layout_changes,
            next_serving_s=next_serving_s,
            service_serves=np.array([bool(pods) for pods in by_service]),
            serving_pods=serving_pods,
            serving_slots=np.array([pod.slot for pod in serving_pods], dtype=np.int64),
            serving_service=np.array([pod.service_index for pod in serving_pods], dtype=np.int64),
            serving_shares=np.array(shares, dtype=float),
            serving_prefill_share=np.array([pod.service.prefill_share for pod in serving_pods], dtype=float),
            serving_tokens_scale=np.array([pod.service.tokens_scale for pod in serving_pods], dtype=float),
            serving_max_queue_s=np.array([pod.service.max_queue_s for pod in serving_pods], dtype=float),
            serving_base_latency_s=np.array([pod.service.base_latency_s for pod in serving_pods], dtype=float),
            serving_uncapped_speed=np.array([self._uncapped_speed(pod.gpus[0], pod.service) for pod in serving_pods], dtype=float),
            serving_gpus=np.array(serving_gpus, dtype=np.int64),
            serving_gpu_pod=np.array([i for i, pod in enumerate(serving_pods) for _ in pod.gpus], dtype=np.int64),
            first_gpus=first_gpus,
            first_gpu_models=gpus.columns.take(first_gpus),
            gpus_with_pod=gpus_with_pod,
            gpu_pod_slot=gpus.pod_slot[gpus_with_pod],
            gpu_service=self.world.pod_arrays.service_index[gpus.pod_slot[gpus_with_pod]],
        )
        return layout

    def _shares(self, service: Service, pods: list[SimPod]) -> list[float]:
        key = tuple(pod.key for pod in pods)
        cached = self.shares.get(service.name)
        if cached is None or cached[0] != key:
            shares = bounded_shares([p.weight for p in pods], [p.uncapped_tokens_s for p in pods], service.load_bound)
            cached = self.shares[service.name] = (key, shares)
        return cached[1]

    def _sample_latency(self, second: int, t_s: float) -> None:
        """Once a second, per serving pod: ``baseLatencyS / speed + backlog / rate`` weighted by its
        traffic (``speed``: its first GPU's relative throughput at full load under its cap)."""
        layout = self._layout(t_s)
        if not len(layout.serving_slots):
            return
        gpus, pods = self.world.gpu_arrays, self.world.pod_arrays
        first = layout.first_gpus
        effective_cap_w = thermal_caps_w(layout.first_gpu_models, gpus.cap_w[first], gpus.temperature_c[first])
        _, _, speed = operating_points(layout.first_gpu_models, effective_cap_w, 1.0, layout.serving_prefill_share)
        speed = speed / layout.serving_uncapped_speed
        backlog = pods.backlog_tokens[layout.serving_slots]
        rate = pods.rate_tokens_s[layout.serving_slots]
        max_queue_s = layout.serving_max_queue_s
        with np.errstate(divide="ignore", invalid="ignore"):
            queue_s = np.where(backlog <= 0, 0.0, np.where(rate > 0, np.minimum(backlog / rate, max_queue_s), max_queue_s))
        latency_s = layout.serving_base_latency_s / np.maximum(speed, 1e-9) + queue_s
        offered_s = pods.offered_tokens_s[layout.serving_slots]
        for index in np.unique(layout.serving_service).tolist():
            mine = layout.serving_service == index
            samples = (latency_s[mine], offered_s[mine])
            self.recorder.service_latency[index].append(samples)
            if second < self.recorder.seconds:
                self.recorder.service_latency_p99_s[index][second] = weighted_percentile_of(*samples, LATENCY_PERCENTILE)

    def _uncapped_speed(self, gpu: SimGpu, service: Service) -> float:
        key = (gpu.model.name, service.prefill_share)
        if key not in self.uncapped_speed:
            full = physics.Workload(1.0, service.prefill_share)
            self.uncapped_speed[key] = physics.operating_point(gpu.model, gpu.model.max_limit_w, full).relative_throughput
        return self.uncapped_speed[key]

    def _end_of_second(self, second: int) -> None:
        self.second_sums.add_to(self.recorder, second)
        for index, service in enumerate(self.scenario.services):
            policy_key = f"{service.namespace}/{service.policy_name}" if service.policy_name else None
            policy = self.world.parsed_policies.get(policy_key) if policy_key else None
            self.recorder.service_cap_w[index][second] = float(policy.power_cap_w) if policy is not None and policy.enforced else None
        self.recorder.pending_pods[second] = len(self.world.pending)


def _reported(pod: SimPod) -> bool:
    """Whether the pod's node telemetry lists it on one of its GPUs."""
    telemetry = pod.node.telemetry if pod.node is not None else None
    return telemetry is not None and any(gpu.pod == pod.key for gpu in telemetry.gpus)


@dataclass(eq=False)
class _Layout:
    """Which GPU serves which pod: the index arrays of the physics step, rebuilt when a pod
    binds, unbinds or starts serving (``serving_*``: per serving pod, by service then
    creation; ``gpu_*``: per GPU holding a pod, in GPU order)."""

    layout_changes: int  # PodArrays.layout_changes it was built at
    next_serving_s: float  # when a bound pod starts serving
    service_serves: np.ndarray  # per service: whether any pod serves
    serving_pods: list[SimPod]
    serving_slots: np.ndarray
    serving_service: np.ndarray
    serving_shares: np.ndarray  # of its service's traffic
    serving_prefill_share: np.ndarray
    serving_tokens_scale: np.ndarray
    serving_max_queue_s: np.ndarray
    serving_base_latency_s: np.ndarray
    serving_uncapped_speed: np.ndarray  # relative throughput of its first GPU with no cap at full load
    serving_gpus: np.ndarray  # GPU slots of the serving pods
    serving_gpu_pod: np.ndarray  # for each of those GPUs, its pod's place in serving_*
    first_gpus: np.ndarray  # each serving pod's first GPU
    first_gpu_models: ModelColumns
    gpus_with_pod: np.ndarray
    gpu_pod_slot: np.ndarray
    gpu_service: np.ndarray


class _SecondSums:
    """The physics steps' sums over the current simulated second, added to the recorder at its end."""

    def __init__(self, services: int, racks: int) -> None:
        self.services, self.racks = services, racks
        self.clear()

    def clear(self) -> None:
        self.service_energy_j = np.zeros(self.services)
        self.service_tokens = np.zeros(self.services)
        self.service_offered_tokens = np.zeros(self.services)
        self.service_dropped_tokens = np.zeros(self.services)
        self.service_caps_sum_w = np.zeros(self.services)
        self.rack_energy_j = np.zeros(self.racks)
        self.rack_inlet_c_s = np.zeros(self.racks)
        self.cluster_energy_j = 0.0
        self.non_gpu_energy_j = 0.0

    def add_to(self, recorder: Recorder, second: int) -> None:
        if second >= recorder.seconds:
            self.clear()
            return
        for series, values in (
            (recorder.service_energy_j, self.service_energy_j),
            (recorder.service_tokens, self.service_tokens),
            (recorder.service_offered_tokens, self.service_offered_tokens),
            (recorder.service_dropped_tokens, self.service_dropped_tokens),
            (recorder.rack_energy_j, self.rack_energy_j),
            (recorder.rack_inlet_c_s, self.rack_inlet_c_s),
        ):
            for index, value in enumerate(values.tolist()):
                series[index][second] += value
        for index, value in enumerate(self.service_caps_sum_w.tolist()):
            recorder.service_caps_sum_w[index][second] = max(recorder.service_caps_sum_w[index][second], value)
        recorder.cluster_energy_j[second] += self.cluster_energy_j
        recorder.non_gpu_energy_j[second] += self.non_gpu_energy_j
        self.clear()
