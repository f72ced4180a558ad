"""PNG plots of a simulation (matplotlib, Agg canvas; no pyplot global state).

- ``services.png``: per service, tokens/s served per strategy against the offered traffic,
  the tokens dropped, and the p99 latency proxy: where the strategies differ;
- ``service-power.png``: each service's power (1-second averages) per strategy, against its
  powerCapLimit over time;
- ``racks.png``: each rack's power against maxPower, and its inlet temperature against
  maxTemperature;
- ``throughput.png``: tokens/s (offered and served) and tokens per joule over time, and the
  run totals per strategy.

Lives outside the pure engine: only the ``powercap simulate`` command imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MultipleLocator, StrMethodFormatter

from powercap.numeric import counted
from powercap.simulation.engine import SimulationResult, StrategyRun
from powercap.simulation.scenario import HOURS_PER_DAY, Scenario

STRATEGY_STYLES: dict[str, dict[str, Any]] = {
    "no-capping": {"color": "#d62728", "linewidth": 1.0, "alpha": 0.8},
    "static-split": {"color": "#1f77b4", "linewidth": 1.0, "alpha": 0.85},
    "powercap": {"color": "#2ca02c", "linewidth": 1.4, "alpha": 0.95},
}
LIMIT_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 1.3}
TEMPERATURE_LIMIT_STYLE: dict[str, Any] = {"color": "#8c564b", "linestyle": "-.", "linewidth": 1.3}
OFFERED_STYLE: dict[str, Any] = {"color": "black", "linestyle": ":", "linewidth": 1.2}
THOUSANDS = StrMethodFormatter("{x:,.0f}")
SERVED_ABOVE_OFFERED = "served can pass offered while queued work drains"
SMOOTHING_S = 10
"""Window of the moving average drawn for tokens/s and tokens/J (the 1-s series are noisy)."""
DPI = 110


def style_of(name: str) -> dict[str, Any]:
    return STRATEGY_STYLES.get(name, {"linewidth": 1.0})


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` samples (fewer at the start)."""
    result, running = [], 0.0
    for index, value in enumerate(values):
        running += value
        if index >= window:
            running -= values[index - window]
        result.append(running / min(index + 1, window))
    return result


def write_plots(result: SimulationResult, out_dir: Path) -> list[Path]:
    """Write every plot into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _save(plot_services(result), out_dir / "services.png"),
        _save(plot_service_power(result), out_dir / "service-power.png"),
        _save(plot_racks(result), out_dir / "racks.png"),
        _save(plot_throughput(result), out_dir / "throughput.png"),
    ]


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def _seconds(run: StrategyRun) -> list[int]:
    return list(range(run.recorder.seconds))


def _step_line(axes: Axes, values: Sequence[float | None], label: str, style: dict[str, Any] = LIMIT_STYLE) -> None:
    """A limit over time as a dashed step line (gaps where there is none)."""
    xs = list(range(len(values)))
    ys = [math.nan if v is None else v for v in values]
    axes.step(xs, ys, where="post", label=label, **style)


def compresses_day(scenario: Scenario) -> bool:
    """Whether some service follows a daily shape that changes over the day (not a trace)."""
    return any(service.trace is None and len(set(service.daily_shape)) > 1 for service in scenario.services)


def _hour_axis(axes: Axes, scenario: Scenario) -> None:
    """The hour of the simulated day along the top of ``axes`` (the day compressed into
    ``dayLengthS`` from ``dayStartHour``), when the scenario compresses one."""
    if not compresses_day(scenario):
        return
    workload = scenario.workload
    hours_per_s = HOURS_PER_DAY / workload.day_length_s
    start = workload.day_start_hour
    def to_hours(t: Any) -> Any:
        return start + t * hours_per_s

    def to_seconds(h: Any) -> Any:
        return (h - start) / hours_per_s

    top = axes.secondary_xaxis("top", functions=(to_hours, to_seconds))
    span_h = scenario.duration_s * hours_per_s
    step = next((step for step in (1, 2, 3, 6, 12) if span_h / step <= 9), 24)
    top.xaxis.set_major_locator(MultipleLocator(step))
    top.xaxis.set_major_formatter(FuncFormatter(lambda h, _: f"{int(round(h)) % HOURS_PER_DAY:02d}:00"))
    top.set_xlabel("hour of the simulated day", fontsize=8)
    top.tick_params(labelsize=8)


def _time_axes(axes_list: Any, result: SimulationResult, top_row: Any) -> None:
    """Simulated seconds below the bottom row, the hour of the day above the top row."""
    for axes in axes_list:
        axes.set_xlim(0, max(1, result.runs[0].recorder.seconds if result.runs else 1))
    for axes in top_row:
        _hour_axis(axes, result.scenario)


def _mark_events(axes: Axes, result: SimulationResult) -> None:
    """A dotted vertical line at each powerCapLimit change."""
    for run in result.runs[:1]:
        for at_s, _policy, _cap_w in run.cap_changes:
            axes.axvline(at_s, color="grey", linewidth=0.8, linestyle=":")


def _figure_legend(
    figure: Figure, axes: Axes | None, handles: list[Any] | None = None, labels: list[str] | None = None
) -> None:
    """One legend for the whole figure, below the plots, so that no line is hidden."""
    if axes is not None:
        handles, labels = axes.get_legend_handles_labels()
    if handles and labels:
        figure.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)


def plot_service_power(result: SimulationResult) -> Figure:
    services = result.scenario.services
    figure = Figure(figsize=(11, 3.0 * len(services) + 1.2), constrained_layout=True)
    figure.suptitle(f"Service power vs powerCapLimit (1-s averages) - scenario {result.scenario.name}")
    axes_list = figure.subplots(len(services), 1, squeeze=False, sharex=True)[:, 0]
    for index, (axes, service) in enumerate(zip(axes_list, services)):
        for run in result.runs:
            recorder = run.recorder
            axes.plot(_seconds(run), recorder.service_energy_j[index], label=run.strategy.name, **style_of(run.strategy.name))
        caps = result.runs[0].recorder.service_cap_w[index] if result.runs else []
        if any(cap is not None for cap in caps):
            _step_line(axes, caps, "powerCapLimit")
        _mark_events(axes, result)
        policy = f"policy {service.namespace}/{service.policy_name}" if service.policy_name else "no policy"
        axes.set_title(f"{service.name}: {counted(service.replicas, 'pod')} x {counted(service.gpus_per_pod, 'GPU')}, "
                       f"{service.model_size_b:g}B, {policy}", fontsize=10)
        axes.set_ylabel("power (W)")
        axes.set_ylim(bottom=0)
        axes.yaxis.set_major_formatter(THOUSANDS)
        axes.grid(True, alpha=0.3)
    axes_list[-1].set_xlabel("simulated time (s)")
    _time_axes(axes_list, result, axes_list[:1])
    _figure_legend(figure, axes_list[0])
    return figure


def plot_racks(result: SimulationResult) -> Figure:
    racks = result.scenario.racks
    figure = Figure(figsize=(12, 3.0 * len(racks) + 1.2), constrained_layout=True)
    figure.suptitle("Rack power vs maxPower and inlet temperature vs maxTemperature (1-s averages)")
    # one scale per column, so that racks compare at a glance
    grid = figure.subplots(len(racks), 2, squeeze=False, sharex=True, sharey="col")
    for index, rack in enumerate(racks):
        power_axes, inlet_axes = grid[index]
        for run in result.runs:
            style = style_of(run.strategy.name)
            power_axes.plot(_seconds(run), run.recorder.rack_energy_j[index], label=run.strategy.name, **style)
            inlet_axes.plot(_seconds(run), run.recorder.rack_inlet_c(index), label=run.strategy.name, **style)
        seconds = result.runs[0].recorder.seconds if result.runs else 0
        if rack.max_power_w is not None:
            _step_line(power_axes, [rack.max_power_w] * seconds, "maxPower")
        if rack.max_temperature_c is not None:
            _step_line(inlet_axes, [rack.max_temperature_c] * seconds, "maxTemperature", TEMPERATURE_LIMIT_STYLE)
        power_axes.set_title(f"{rack.rack_id}: power", fontsize=10)
        power_axes.set_ylabel("power (W)")
        power_axes.set_ylim(bottom=0)
        power_axes.yaxis.set_major_formatter(THOUSANDS)
        inlet_axes.set_title(f"{rack.rack_id}: inlet air (supply {rack.cooling.supply_c:g} °C, +{rack.cooling.rise_c_per_kw:g} °C/kW)", fontsize=10)
        inlet_axes.set_ylabel("inlet (°C)")
        for axes in (power_axes, inlet_axes):
            axes.grid(True, alpha=0.3)
            _mark_events(axes, result)
    for axes in grid[-1]:
        axes.set_xlabel("simulated time (s)")
    _time_axes(list(grid.flat), result, grid[0])
    handles, labels = _legend_entries(grid.flat)
    _figure_legend(figure, None, handles, labels)
    return figure


def _legend_entries(axes_list: Any) -> tuple[list[Any], list[str]]:
    """Every distinct label of the axes once (strategies, then the limits), first handle wins."""
    handles: list[Any] = []
    labels: list[str] = []
    for axes in axes_list:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


def plot_throughput(result: SimulationResult) -> Figure:
    figure = Figure(figsize=(12, 8.5), constrained_layout=True)
    figure.suptitle(f"Throughput and energy efficiency ({SMOOTHING_S}-s moving averages)")
    grid = figure.subplots(2, 2, gridspec_kw={"width_ratios": [3, 1]})
    tokens_axes, totals_axes = grid[0]
    ratio_axes, ratio_totals_axes = grid[1]
    names, tokens_s, tokens_j = [], [], []
    for run in result.runs:
        recorder = run.recorder
        served = [math.fsum(column) for column in zip(*recorder.service_tokens)]
        energy = recorder.cluster_energy_j
        style = style_of(run.strategy.name)
        tokens_axes.plot(_seconds(run), moving_average(served, SMOOTHING_S), label=f"{run.strategy.name} served", **style)
        window_tokens = moving_average(served, SMOOTHING_S)
        window_energy = moving_average(energy, SMOOTHING_S)
        ratio_axes.plot(
            _seconds(run), [t / e if e > 0 else math.nan for t, e in zip(window_tokens, window_energy)],
            label=run.strategy.name, **style,
        )
        names.append(run.strategy.name)
        tokens_s.append(math.fsum(served) / result.scenario.duration_s)
        total_energy = math.fsum(energy)
        tokens_j.append(math.fsum(served) / total_energy if total_energy > 0 else 0.0)
    if result.runs:
        recorder = result.runs[0].recorder
        offered = [math.fsum(column) for column in zip(*recorder.service_offered_tokens)]
        tokens_axes.plot(_seconds(result.runs[0]), moving_average(offered, SMOOTHING_S), label="offered", **OFFERED_STYLE)
    tokens_axes.set_title(f"cluster tokens/s over time ({SERVED_ABOVE_OFFERED})", fontsize=10)
    tokens_axes.yaxis.set_major_formatter(THOUSANDS)
    tokens_axes.set_ylabel("generated tokens/s")
    ratio_axes.set_title("cluster tokens per joule over time (all GPUs, idle ones included)", fontsize=10)
    ratio_axes.set_ylabel("tokens/J")
    ratio_axes.set_xlabel("simulated time (s)")
    for axes in (tokens_axes, ratio_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower left", fontsize=8, ncol=2)
        axes.set_ylim(bottom=0)
        _mark_events(axes, result)
    ratio_axes.sharex(tokens_axes)
    _time_axes([tokens_axes, ratio_axes], result, [tokens_axes])
    colors = [style_of(name).get("color") for name in names]
    for axes, values, title, unit in (
        (totals_axes, tokens_s, "run average tokens/s", "tokens/s"),
        (ratio_totals_axes, tokens_j, "run tokens per joule", "tokens/J"),
    ):
        bars = axes.bar(names, values, color=colors)
        axes.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.2f}" for v in values], fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.set_ylabel(unit)
        if unit == "tokens/s":
            axes.yaxis.set_major_formatter(THOUSANDS)
        axes.tick_params(axis="x", labelrotation=20, labelsize=8)
        axes.grid(True, axis="y", alpha=0.3)
    return figure


def plot_services(result: SimulationResult) -> Figure:
    """Per service (a row): tokens/s served per strategy against the offered traffic, tokens
    dropped per second, and the p99 latency proxy of each second (``SMOOTHING_S`` moving
    averages); the row's title gives the run's figures, so that a service's gain or loss is
    visible even where another service's tokens dominate the cluster's."""
    services = result.scenario.services
    figure = Figure(figsize=(15, 3.1 * len(services) + 1.2), constrained_layout=True)
    figure.suptitle(f"Per service: served vs offered tokens/s, dropped tokens/s, p99 latency proxy ({SMOOTHING_S}-s moving averages)")
    grid = figure.subplots(len(services), 3, squeeze=False, sharex=True, gridspec_kw={"width_ratios": [2.4, 1, 1]})
    for index, service in enumerate(services):
        served_axes, dropped_axes, latency_axes = grid[index]
        totals = []
        for run in result.runs:
            recorder = run.recorder
            style = style_of(run.strategy.name)
            seconds = _seconds(run)
            served = recorder.service_tokens[index]
            dropped = recorder.service_dropped_tokens[index]
            latency = [math.nan if v is None else v for v in recorder.service_latency_p99_s[index]]
            served_axes.plot(seconds, moving_average(served, SMOOTHING_S), label=run.strategy.name, **style)
            dropped_axes.plot(seconds, moving_average(dropped, SMOOTHING_S), label=run.strategy.name, **style)
            latency_axes.plot(seconds, _nan_moving_average(latency, SMOOTHING_S), label=run.strategy.name, **style)
            offered_total = math.fsum(recorder.service_offered_tokens[index])
            dropped_share = 100.0 * math.fsum(dropped) / offered_total if offered_total > 0 else 0.0
            totals.append(f"{run.strategy.name} {math.fsum(served) / max(1, recorder.seconds):,.0f}/s ({dropped_share:.1f} %)")
        if result.runs:
            offered = result.runs[0].recorder.service_offered_tokens[index]
            served_axes.plot(_seconds(result.runs[0]), moving_average(offered, SMOOTHING_S), label="offered", **OFFERED_STYLE)
        served_axes.set_title(f"{service.name} served (dropped): " + ", ".join(totals), fontsize=8.5, loc="left")
        served_axes.set_ylabel("generated tokens/s")
        dropped_axes.set_title(f"{service.name}: tokens dropped (waited > {service.max_queue_s:g} s)", fontsize=9)
        dropped_axes.set_ylabel("tokens/s")
        latency_axes.set_title(f"{service.name}: p99 latency proxy (base {service.base_latency_s:g} s)", fontsize=9)
        latency_axes.set_ylabel("seconds")
        for axes in (served_axes, dropped_axes):
            axes.yaxis.set_major_formatter(THOUSANDS)
        for axes in grid[index]:
            axes.set_ylim(bottom=0)
            axes.grid(True, alpha=0.3)
            _mark_events(axes, result)
    for axes in grid[-1]:
        axes.set_xlabel("simulated time (s)")
    _time_axes(list(grid.flat), result, grid[0][:1])  # the narrow panels have no room for the hours
    handles, labels = _legend_entries(grid.flat)
    if handles:
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(f"({SERVED_ABOVE_OFFERED})")
    _figure_legend(figure, None, handles, labels)
    return figure


def _nan_moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` samples, skipping NaN (no serving pod in that second)."""
    result = []
    for index in range(len(values)):
        chunk = [v for v in values[max(0, index - window + 1):index + 1] if not math.isnan(v)]
        result.append(math.fsum(chunk) / len(chunk) if chunk else math.nan)
    return result
