"""``powercap simulate``: run the whole system on a simulated GPU cluster and show the result.

Runs the scenario (the built-in one by default) once per strategy (no capping, static
equal split, powercap), shows a progress bar on stderr, prints a results table on
stdout, and writes ``summary.json`` and PNG plots into ``--out``.

Exit status: 0 on success; 2 when the scenario cannot be read or is invalid (every
problem is listed with its path) or the usage is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from powercap.runtime.cliargs import non_negative_int, positive_seconds
from powercap.simulation.engine import SimulationResult, simulate
from powercap.simulation.scenario import Scenario, ScenarioError, default_scenario_text, load_scenario
from powercap.simulation.summary import summarize
from powercap.simulation.tracefile import TraceError

EXIT_OK, EXIT_BAD_SCENARIO = 0, 2
MIN_DURATION_S, MAX_DURATION_S = 1.0, 1_000_000.0  # durationS in powercap/data/scenario-schema.yaml
DEFAULT_OUT = "out/simulation"
PROGRESS_WIDTH = 30


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run powercap on a simulated GPU cluster and compare strategies",
        description="Simulate a GPU cluster serving LLM traffic under three strategies (no capping, "
        "static equal split of each policy's cap, powercap) with the real placement, allocation and "
        "control-law code, in simulated time. Prints a results table; writes summary.json and PNG plots. "
        "Exit 0: done; 2: the scenario is unreadable or invalid.",
    )
    parser.add_argument("--scenario", metavar="FILE", help="scenario YAML (default: the built-in 64-GPU scenario)")
    parser.add_argument("--duration", type=duration_seconds, metavar="SECONDS",
                        help=f"simulated seconds, {MIN_DURATION_S:g} to {MAX_DURATION_S:.0f} (overrides durationS)")
    parser.add_argument("--seed", type=non_negative_int, metavar="N", help="random seed (overrides seed)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default: {DEFAULT_OUT})")
    parser.set_defaults(func=run)


def duration_seconds(text: str) -> float:
    """argparse ``type=`` of --duration: the range the scenario schema allows for durationS."""
    value = positive_seconds(text)
    if not MIN_DURATION_S <= value <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"{text!r} must be between {MIN_DURATION_S:g} and {MAX_DURATION_S:.0f} seconds")
    return value


def run(args: argparse.Namespace) -> int:
    scenario = read_scenario(args.scenario, sys.stderr)
    if scenario is None:
        return EXIT_BAD_SCENARIO
    try:
        scenario = scenario.with_overrides(duration_s=args.duration, seed=args.seed)
    except ScenarioError as error:
        for problem in error.problems:
            print(f"{args.scenario or 'built-in scenario'}: --duration {args.duration:g}: {problem}", file=sys.stderr)
        return EXIT_BAD_SCENARIO
    out_dir = Path(args.out)
    try:  # before the run, not after it: a bad --out must not cost the simulation
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write into {out_dir}")
    except OSError as error:
        reason = "exists and is not a directory" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror or str(error)
        print(f"powercap simulate: --out {args.out}: {reason}", file=sys.stderr)
        return EXIT_BAD_SCENARIO
    write_plots = plot_writer(sys.stderr)
    progress = ProgressBar(sys.stderr, strategies=3)
    started = time.perf_counter()
    result = simulate(scenario, progress=progress.update, clock=time.perf_counter)
    wall_s = time.perf_counter() - started
    progress.finish()
    summary = summarize(result)
    summary["wallSeconds"] = round(wall_s, 3)
    summary["speedVsRealTime"] = round(scenario.duration_s / wall_s, 1) if wall_s > 0 else None
    write_report(result, summary, sys.stdout)
    summary_path = out_dir / "summary.json"
    try:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plots = write_plots(result, out_dir) if write_plots else []
    except OSError as error:
        print(f"powercap simulate: writing into {out_dir} failed: {error}", file=sys.stderr)
        return EXIT_BAD_SCENARIO
    print(f"\nwrote {summary_path}")
    if plots:
        print("plots: " + ", ".join(str(path) for path in plots))
    return EXIT_OK


PlotWriter = Callable[[SimulationResult, Path], list[Path]]


def plot_writer(err: TextIO) -> PlotWriter | None:
    """The plots' writer, or None (said on ``err``) when matplotlib, an optional extra of
    powercap that the programs' images leave out, is not installed."""
    try:
        from powercap.simulation.plots import write_plots  # matplotlib is slow to import; only here
    except ImportError as error:
        missing = (error.name or 'matplotlib').split('.')[0]
        print(f"powercap simulate: no plots: {missing} is not installed "
              "(pip install 'powercap[simulate]'); the table and summary.json are written", file=err)
        return None
    return write_plots


def read_scenario(path: str | None, err: TextIO) -> Scenario | None:
    """The scenario at ``path`` (the built-in one when None); None after reporting why it is unusable."""
    name = path or "built-in scenario"
    try:
        if path is None:
            return load_scenario(default_scenario_text())
        directory = Path(path).parent

        def read_trace(name: str) -> Iterator[str]:
            with (directory / name).open(encoding="utf-8", newline="") as lines:
                try:
                    yield from lines
                except UnicodeDecodeError:
                    raise TraceError(undecodable_line(directory / name)) from None

        return load_scenario(Path(path).read_text(encoding="utf-8"), read_trace=read_trace)
    except FileNotFoundError:
        err.write(f"{name}: error: no such file\n")
    except IsADirectoryError:
        err.write(f"{name}: error: is a directory\n")
    except PermissionError:
        err.write(f"{name}: error: permission denied\n")
    except UnicodeDecodeError:
        err.write(f"{name}: error: not UTF-8 text\n")
    except ScenarioError as error:
        for problem in error.problems:
            err.write(f"{name}: {problem}\n")
        err.write(f"{name}: {len(error.problems)} problem(s); see docs/simulator.md for the format\n")
    return None


def undecodable_line(path: Path) -> str:
    """Where a file that is not UTF-8 stops being so: its first such line, and the byte."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
    return "not UTF-8 text"


class ProgressBar:
    """A progress bar on a terminal; a line per finished strategy otherwise (logs, CI)."""

    def __init__(self, stream: TextIO, strategies: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.stream = stream
        self.strategies = strategies
        self.interactive = bool(getattr(stream, "isatty", lambda: False)())
        self.clock = clock
        self.done: list[str] = []
        self.current: str | None = None
        self.started = clock()

    def update(self, strategy: str, fraction: float) -> None:
        if strategy != self.current:
            self.current = strategy
            self.strategy_started = self.clock()
        if self.interactive:
            overall = (len(self.done) + fraction) / self.strategies
            filled = int(round(PROGRESS_WIDTH * overall))
            bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {100 * overall:5.1f}%  {strategy:<14}")
            self.stream.flush()
        if fraction >= 1.0 and strategy not in self.done:
            self.done.append(strategy)
            if not self.interactive:
                elapsed = self.clock() - self.strategy_started
                self.stream.write(f"simulated {strategy} ({len(self.done)}/{self.strategies}) in {elapsed:.1f} s\n")
                self.stream.flush()

    def finish(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def write_report(result: SimulationResult, summary: dict[str, Any], out: TextIO) -> None:
    """The results table and the headline comparisons."""
    scenario = result.scenario
    info = summary["scenario"]
    out.write(
        f"scenario {info['name']}: {info['gpus']} GPUs, {info['nodes']} nodes, {len(info['racks'])} racks, "
        f"{len(info['services'])} services; {scenario.duration_s:g} s simulated, seed {scenario.seed}\n"
    )
    for service in scenario.services:
        if service.trace is not None:
            trace = service.trace
            out.write(
                f"{service.name}: replays {trace.file} ({trace.format}, {trace.recorded.duration_s:g} s, "
                f"{trace.recorded.total_tokens:,.0f} tokens) from {trace.start_s:g} s at {trace.speedup:g}x, tokens x {trace.scale:g}\n"
            )
    out.write("\n")
    services = list(info["services"])
    header = ["strategy", "tokens/s", "tokens/J", "kWh", "cap viol. s", "within cap", "rack W viol. s",
              "rack °C viol. s", "p99 latency s", "dropped"]
    rows = [header, ["", "", "", "", "(converged)", "", "", "", "/".join(services), ""]]
    for name, figures in summary["strategies"].items():
        latencies = "/".join(_fmt(figures["services"][s]["p99LatencyProxyS"], 1) for s in services)
        rows.append([
            name,
            f"{figures['tokensPerSecond']:,.0f}",
            _fmt(figures["tokensPerJoule"], 2),
            _fmt(figures["energyKWh"], 2),
            f"{figures['capViolationSeconds']} ({figures['capViolationSecondsAfterConvergence']})",
            _percent(figures["withinCapPercent"]),
            str(figures["rackPowerViolationSeconds"]),
            str(figures["rackTemperatureViolationSeconds"]),
            latencies,
            f"{figures['droppedPercent']:.1f} %",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        out.write("  ".join(cells).rstrip() + "\n")
        if index == 1:
            out.write("  ".join("-" * width for width in widths) + "\n")
    out.write("\n")
    comparison = summary["comparison"]
    if "powercapVsStaticTokensPercent" in comparison:
        by_service = ", ".join(
            f"{name} {_signed(value)}" for name, value in comparison["powercapVsStaticTokensPercentByService"].items()
        )
        out.write(
            f"powercap vs static-split at the same caps: tokens/s {_signed(comparison['powercapVsStaticTokensPercent'])} "
            f"({by_service}), tokens/J {_signed(comparison['powercapVsStaticTokensPerJoulePercent'])}\n"
        )
    if "noCappingVsStaticTokensPercent" in comparison:
        out.write(
            f"no-capping vs static-split: tokens/s {_signed(comparison['noCappingVsStaticTokensPercent'])} "
            "(what the caps cost the equal split; no split of the same caps can win back more)\n"
        )
    if "powercapVsNoCappingEnergyPercent" in comparison:
        out.write(
            f"powercap vs no-capping: energy {_signed(comparison['powercapVsNoCappingEnergyPercent'])}, "
            f"tokens/s {_signed(comparison['powercapVsNoCappingTokensPercent'])}\n"
        )
    powercap = summary["strategies"].get("powercap")
    for change in (powercap or {}).get("capChanges", []):
        recovery = change["recoveryS"]
        back = f"back under the cap in {recovery:.1f} s" if recovery is not None else "never back under the cap"
        out.write(f"cap change at {change['atS']:g} s ({change['policy']} -> {change['powerCapLimitW']} W): powercap {back}\n")
    if summary.get("wallSeconds"):
        out.write(
            f"speed: {scenario.duration_s:g} s of {info['gpus']} GPUs x {len(summary['strategies'])} strategies simulated "
            f"in {summary['wallSeconds']:.1f} s ({summary['speedVsRealTime']:g}x real time)\n"
        )


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} %"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f} %"
