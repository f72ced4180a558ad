"""``powercap simulate``: run the whole system on a simulated GPU cluster and show the result.

Runs the scenario (the built-in one by default) once per strategy (no capping, static
equal split, powercap), shows a progress bar on stderr, prints a results table on
stdout, and writes ``summary.json``, PNG plots and ``report.html`` into ``--out``.

Before the run it names what the run cannot contain (events past its end, an empty
"after convergence" window) and the services offered more than they can serve uncapped.
``--out`` is replaced whole: the run writes into a fresh folder beside it and renames it
into place when complete, so it holds one whole run or the previous one. Ctrl-C at any
point exits 130 with one line saying what ``--out`` holds.

Exit status: 0 on success; 2 when the scenario cannot be read or is invalid (every
problem is listed with its path), ``--out`` cannot be written, or the usage is wrong;
130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from powercap.numeric import counted
from powercap.runtime.cliargs import non_negative_int, positive_seconds
from powercap.simulation.engine import SimulationResult, simulate
from powercap.simulation.scenario import Scenario, ScenarioError, default_scenario_text, load_scenario, run_notices
from powercap.simulation.summary import comparison_lines, format_table, render_html, results_table, summarize
from powercap.simulation.tracefile import TraceError
from powercap.simulation.workload import build_trace, overload_notices

EXIT_OK, EXIT_BAD_SCENARIO, EXIT_INTERRUPTED = 0, 2, 130
MIN_DURATION_S, MAX_DURATION_S = 1.0, 1_000_000.0  # durationS in powercap/data/scenario-schema.yaml
DEFAULT_OUT = "out/simulation"
PROGRESS_WIDTH = 30
OUTPUT_NAMES = frozenset({
    "summary.json", "report.html", "services.png", "service-power.png", "racks.png", "throughput.png",
})
"""What a run writes into --out (and what earlier versions wrote): a folder holding only these
may be replaced by the next run; one holding anything else is not ours to replace."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run powercap on a simulated GPU cluster and compare strategies",
        description="Simulate a GPU cluster serving LLM traffic under three strategies (no capping, "
        "static equal split of each policy's cap, powercap) with the real placement, allocation and "
        "control-law code, in simulated time. Prints a results table; writes summary.json, PNG plots "
        "and report.html (one self-contained page) into --out, replacing its previous run whole. "
        "Exit 0: done; 2: the scenario is unreadable or invalid, or --out cannot be written; 130: interrupted.",
    )
    parser.add_argument("--scenario", metavar="FILE", help="scenario YAML (default: the built-in 64-GPU scenario)")
    parser.add_argument("--duration", type=duration_seconds, metavar="SECONDS",
                        help=f"simulated seconds, {MIN_DURATION_S:g} to {MAX_DURATION_S:.0f} (overrides durationS)")
    parser.add_argument("--seed", type=non_negative_int, metavar="N", help="random seed (overrides seed)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output directory, replaced by each run (default: {DEFAULT_OUT})")
    parser.set_defaults(func=run)


def duration_seconds(text: str) -> float:
    """argparse ``type=`` of --duration: the range the scenario schema allows for durationS."""
    value = positive_seconds(text)
    if not MIN_DURATION_S <= value <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"{text!r} must be between {MIN_DURATION_S:g} and {MAX_DURATION_S:.0f} seconds")
    return value


def run(args: argparse.Namespace) -> int:
    out = OutputFolder(Path(args.out))
    progress = ProgressBar(sys.stderr, strategies=3)
    try:
        return _run(args, out, progress)
    except KeyboardInterrupt:
        progress.abandon()
        print(f"powercap simulate: interrupted; {out.what_it_holds()}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, out: OutputFolder, progress: ProgressBar) -> int:
    loaded = read_scenario(args.scenario, sys.stderr, duration_s=args.duration, seed=args.seed)
    if loaded is None:
        return EXIT_BAD_SCENARIO
    scenario, scenario_text = loaded
    problem = out.problem()  # before the run, not after it: a bad --out must not cost the simulation
    if problem is not None:
        print(f"powercap simulate: --out {args.out}: {problem}", file=sys.stderr)
        return EXIT_BAD_SCENARIO
    notices = run_notices(scenario) + overload_notices(scenario, build_trace(scenario))
    for notice in notices:
        print(f"powercap simulate: note: {notice}", file=sys.stderr)
    missing_plots = no_plots("matplotlib") if matplotlib_missing() else None
    if missing_plots:
        print(f"powercap simulate: {missing_plots}", file=sys.stderr)
    started = time.perf_counter()
    result = simulate(scenario, progress=progress.update, clock=time.perf_counter)
    wall_s = time.perf_counter() - started
    progress.finish()
    summary = summarize(result)
    summary["notices"] = notices
    summary["wallSeconds"] = round(wall_s, 3)
    summary["speedVsRealTime"] = round(scenario.duration_s / wall_s, 1) if wall_s > 0 else None
    write_report(result, summary, sys.stdout)
    sys.stdout.flush()
    print(f"powercap simulate: writing into {out.path} ...", file=sys.stderr, flush=True)

    def fill(folder: Path) -> list[str]:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plots: list[Path] = []
        if missing_plots is None:
            write_plots = plot_writer(sys.stderr)  # imports matplotlib: seconds, and interruptible
            if write_plots is not None:
                plots = write_plots(result, folder)
        intro = report_intro(result, summary)
        images = [(path.name, path.read_bytes()) for path in plots]
        html = render_html(summary, intro, notices, images, scenario_text, missing_plots)
        (folder / "report.html").write_text(html, encoding="utf-8")
        return [path.name for path in plots]

    try:
        plot_names = out.replace_with(fill)
    except OSError as error:
        print(f"powercap simulate: writing into {out.path} failed: {error}; {out.what_it_holds()}", file=sys.stderr)
        return EXIT_BAD_SCENARIO
    print(f"\nwrote {out.path / 'summary.json'} and {out.path / 'report.html'} (the table, plots and scenario in one page)")
    if plot_names:
        print("plots: " + ", ".join(str(out.path / name) for name in plot_names))
    return EXIT_OK


class OutputFolder:
    """``--out``, replaced whole by a run.

    :meth:`replace_with` fills a fresh folder beside it (``.NAME.partial-*``) and, once
    complete, renames it into place (the previous run, renamed aside first, is then
    removed; Ctrl-C is held back between the two renames). So ``--out`` holds one whole
    run or the previous one, and an interrupted run leaves no partial folder behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replaced = False
        self.had_run = path.is_dir() and any(path.iterdir()) if path.exists() else False

    @property
    def _target(self) -> Path:
        """Where the folder really is (an absolute path; a symlink's target)."""
        return Path(os.path.realpath(self.path))

    def problem(self) -> str | None:
        """Why a run could not be written there (None: it can), found before the run."""
        target = self._target
        if target.exists():
            if not target.is_dir():
                return "exists and is not a directory"
            foreign = sorted(p.name for p in target.iterdir() if p.name not in OUTPUT_NAMES)
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                return (f"holds files that powercap simulate did not write ({shown}); a run replaces the whole "
                        "folder, so name a new or empty one")
            parent = target.parent
        else:
            parent = target.parent
            while not parent.exists():
                parent = parent.parent
            if not parent.is_dir():  # a file where a folder of the path should be
                return "exists and is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot write into {parent}"
        return None

    def replace_with(self, fill: Callable[[Path], Any]) -> Any:
        """Run ``fill(folder)`` on a fresh folder beside ``--out``, then put it in its place."""
        target = self._target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging: Path | None = None
        try:
            with _sigint_held_back():  # a folder made is a folder known, so that it is removed
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
                umask = os.umask(0o022)
                os.umask(umask)
                os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the run from others
            outcome = fill(staging)
            with _sigint_held_back():
                aside = None
                if target.exists():
                    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
                    os.replace(target, aside / "run")
                try:
                    os.replace(staging, target)
                except OSError:
                    if aside is not None:
                        os.replace(aside / "run", target)
                        shutil.rmtree(aside, ignore_errors=True)
                    raise
                self.replaced = True
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
            return outcome
        finally:
            if staging is not None and staging.exists():
                with _sigint_held_back():
                    shutil.rmtree(staging, ignore_errors=True)

    def what_it_holds(self) -> str:
        """One clause for the line printed when a run stops: what ``--out`` holds now."""
        if self.replaced:
            return f"{self.path} holds this run"
        if self.had_run:
            return f"nothing written; {self.path} keeps the previous run"
        return f"nothing written; {self.path} was not created" if not self.path.exists() else f"nothing written into {self.path}"


@contextlib.contextmanager
def _sigint_held_back() -> Iterator[None]:
    """Ctrl-C during the block takes effect at its end (the main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


PlotWriter = Callable[[SimulationResult, Path], list[Path]]


def plot_writer(err: TextIO) -> PlotWriter | None:
    """The plots' writer, or None (said on ``err``) when matplotlib, an optional extra of
    powercap that the programs' images leave out, cannot be imported."""
    try:
        from powercap.simulation.plots import write_plots  # matplotlib is slow to import; only here
    except ImportError as error:
        print(f"powercap simulate: {no_plots((error.name or 'matplotlib').split('.')[0])}", file=err)
        return None
    return write_plots


def no_plots(missing_module: str) -> str:
    """Why a run writes no plots, and what it writes instead."""
    return (f"no plots: {missing_module} is not installed (pip install 'powercap[simulate]'); "
            "the table, summary.json and report.html are written")


def matplotlib_missing() -> bool:
    """Whether matplotlib cannot be found, asked before the run without importing it (slow)."""
    try:
        return importlib.util.find_spec("matplotlib") is None
    except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules
        return True


def trace_reader(directory: Path) -> Callable[[str], Iterator[str]]:
    """Reads the trace files a scenario in ``directory`` names, relative to it; a line that is
    not UTF-8 is a :class:`TraceError` naming the file and the line."""
    def read_trace(name: str) -> Iterator[str]:
        with (directory / name).open(encoding="utf-8", newline="") as lines:
            try:
                yield from lines
            except UnicodeDecodeError:
                raise TraceError(undecodable_line(directory / name)) from None
    return read_trace


def read_scenario(
    path: str | None, err: TextIO, duration_s: float | None = None, seed: int | None = None
) -> tuple[Scenario, str] | None:
    """The scenario at ``path`` (the built-in one when None) with the command line's
    overrides applied before its checks, and its text; None after reporting why it is unusable."""
    name = path or "built-in scenario"
    try:
        if path is None:
            text = default_scenario_text()
            return load_scenario(text, duration_s=duration_s, seed=seed), text
        text = Path(path).read_text(encoding="utf-8")
        return load_scenario(text, read_trace=trace_reader(Path(path).parent), duration_s=duration_s, seed=seed), text
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
        err.write(f"{name}: {counted(len(error.problems), 'problem')}; see docs/simulator.md for the format\n")
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
        self.finished = False
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
        self.finished = True

    def abandon(self) -> None:
        """End a bar drawn on a terminal when the run stops part-way, so the next line starts clean."""
        if self.interactive and self.current is not None and not self.finished:
            self.stream.write("\n")
            self.stream.flush()
        self.finished = True


def report_intro(result: SimulationResult, summary: dict[str, Any]) -> list[str]:
    """The lines above the table: the scenario in one line, and what each traced service replays."""
    scenario = result.scenario
    info = summary["scenario"]
    lines = [
        f"scenario {info['name']}: {counted(info['gpus'], 'GPU')}, {counted(info['nodes'], 'node')}, "
        f"{counted(len(info['racks']), 'rack')}, {counted(len(info['services']), 'service')}; "
        f"{scenario.duration_s:g} s simulated, seed {scenario.seed}"
    ]
    for service in scenario.services:
        if service.trace is not None:
            trace = service.trace
            scale = f"tokens x {trace.scale:.3g}"
            if trace.peak_utilisation is not None:
                scale += f" (peakUtilisation {trace.peak_utilisation:g})"
            lines.append(
                f"{service.name}: replays {trace.file} ({trace.format}, {trace.recorded.duration_s:g} s, "
                f"{trace.recorded.total_tokens:,.0f} tokens) from {trace.start_s:g} s at {trace.speedup:g}x, {scale}"
            )
    return lines


def write_report(result: SimulationResult, summary: dict[str, Any], out: TextIO) -> None:
    """The results table and the headline comparisons."""
    lines = report_intro(result, summary) + [""] + format_table(results_table(summary)) + [""]
    lines += comparison_lines(summary)
    if summary.get("wallSeconds"):
        info = summary["scenario"]
        lines.append(
            f"speed: {result.scenario.duration_s:g} s of {counted(info['gpus'], 'GPU')} x "
            f"{counted(len(summary['strategies']), 'strategy', 'strategies')} simulated "
            f"in {summary['wallSeconds']:.1f} s ({summary['speedVsRealTime']:g}x real time)"
        )
    out.write("\n".join(lines) + "\n")
