"""Review of #14's defaults (the whole powerCapLimit shared out, the marginal-value
rebalancing on): inputs the 3 % margin or the rebalancing being off used to keep harmless."""

from __future__ import annotations

from datetime import timedelta

from powercap.allocation import AllocationSettings, GpuState, Service, allocate
from powercap.budget import plan_round
from powercap.marginal import Member, MarginalSettings, marginal_tokens_per_w, rebalance_w
from tests.fakes.clusters import Gpu, node, view
from tests.fakes.objects import NOW, gpu_pod, policy

LLAMA = {"app.kubernetes.io/name": "llama"}


def _gpu(uuid: str, power_w: float, limit_w: float, tokens_s: float | None) -> GpuState:
    return GpuState(uuid=uuid, node="gpu-1", rack=None, min_w=200, max_w=700, power_w=power_w, limit_w=limit_w,
                    previous_w=None, tokens_s=tokens_s)


def test_an_absurd_rate_at_a_near_zero_limit_is_no_estimate() -> None:
    """0.4 x 1e308 tokens/s / 0.1 W overflows to inf: no estimate, not an infinite marginal value."""
    assert marginal_tokens_per_w(1e308, 5.0, 0.1, 0.05) is None
    assert marginal_tokens_per_w(1e308, 5.0, 400.0, 0.05) is not None  # large but finite: kept (then screened)


def test_one_gpus_absurd_telemetry_does_not_crash_the_allocation_of_every_policy() -> None:
    """One agent reports limitW 0.1 and tokensPerSecond 1e308 (both finite, so telemetry reads
    them); beside a traffic-limited GPU of the same group the rebalancing computed
    inf / inf = NaN weights and raised ValueError, failing every round for every policy."""
    service = Service("inference/llama", 700, (
        _gpu("A", 5.0, 0.1, 1e308),      # the hostile report: pinned at a 0.1 W limit
        _gpu("B", 180.0, 400.0, 500.0),  # traffic-limited: a donor
        _gpu("C", 399.0, 400.0, None),   # pinned, no rate: spends the budget
    ))
    settings = AllocationSettings(marginal=MarginalSettings(enabled=True))
    caps = allocate([service], settings=settings).services["inference/llama"].caps
    assert sum(c.cap_w for c in caps) <= 700
    assert all(c.min_w <= c.cap_w <= c.max_w for c in caps)


def test_the_same_telemetry_through_a_controller_round() -> None:
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10)) for i in range(3)]
    nodes = [node("gpu-1", None, [
        Gpu("A", 5, 0.1, "inference/llama-0", tokens_s=1e308),
        Gpu("B", 180, 400, "inference/llama-1", tokens_s=500),
        Gpu("C", 399, 400, "inference/llama-2"),
    ])]
    plan = plan_round(view(nodes, pods, [policy("llama", cap_w=700)]))
    caps = plan.policies["inference/llama"].allocation.caps
    assert sum(c.cap_w for c in caps) <= 700


def test_rebalance_takes_an_infinite_marginal_value_for_no_estimate() -> None:
    """A Member built by another caller with m = inf: the group is left as the fill made it, not a crash."""
    hostile = Member(cap_w=300, min_w=200, max_w=700, power_w=299, limit_w=0.1, marginal=float("inf"), step_w=200,
                     donor_headroom_w=25)
    donor = Member(cap_w=400, min_w=200, max_w=700, power_w=300, limit_w=400, marginal=0.0, step_w=200,
                   donor_headroom_w=25)
    assert rebalance_w([hostile, donor]) == [300, 400]

