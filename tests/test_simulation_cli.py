"""``powercap simulate`` end to end: the table, summary.json, the plots, the exit codes."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from powercap.commands import main
from powercap.simulation.cli import ProgressBar
from powercap.simulation.scenario import default_scenario_text, load_scenario, run_notices

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (raises on anything that is not a PNG)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_simulate_writes_the_table_the_summary_and_the_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    assert main(["simulate", "--duration", "60", "--seed", "4", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    for strategy in ("no-capping", "static-split", "powercap"):
        assert strategy in stdout
        assert f"simulated {strategy}" in stderr  # progress, one line per strategy when not a terminal
    assert "tokens/s" in stdout and "p99 latency s" in stdout
    assert f"plots: {out / 'services.png'}, {out / 'service-power.png'}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["durationS"] == 60 and summary["scenario"]["seed"] == 4
    assert set(summary["strategies"]) == {"no-capping", "static-split", "powercap"}
    assert summary["speedVsRealTime"] > 0
    for name in ("services.png", "service-power.png", "racks.png", "throughput.png"):
        width, height = png_size(out / name)
        assert width >= 800 and height >= 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no partial folder left beside it


def test_report_html_is_one_self_contained_page(tmp_path: Path) -> None:
    """report.html can be attached to a ticket: the table, every plot inline, the scenario."""
    import re

    out = tmp_path / "results"
    assert main(["simulate", "--duration", "30", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert page.startswith("<!DOCTYPE html>")
    for name, figures in summary["strategies"].items():
        assert f"<td>{name}</td><td>{figures['tokensPerSecond']:,.0f}</td>" in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [name for name, _ in images] == ["services.png", "service-power.png", "racks.png", "throughput.png"]
    assert base64.b64decode(images[0][1]) == (out / "services.png").read_bytes()
    assert "name: heterogeneous-64" in page and "powerCapLimit: 6400" in page  # the scenario's text
    assert not re.search(r'(src|href)="(?!data:)', page), "a reference to another file or the network"


def test_a_short_run_names_what_it_cannot_contain_and_shows_no_converged_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    assert main(["simulate", "--duration", "40", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err_lines = captured.err.splitlines()
    notes = [line for line in err_lines if line.startswith("powercap simulate: note: ")]
    assert notes == [
        "powercap simulate: note: the cap change at 300 s (inference/chat -> 4800 W) is past the end of a 40-s run: not simulated",
        "powercap simulate: note: the burst at 270 s (chat x1.4) is past the end of a 40-s run: not simulated",
        "powercap simulate: note: a 40-s run has no second after warmupS (60 s) and the settling after its cap changes: "
        "the figures after convergence are not available",
    ]
    assert err_lines.index(notes[-1]) < next(i for i, line in enumerate(err_lines) if line.startswith("simulated "))
    table = captured.out.split("\n\n")[1]
    assert "no-capping" in table and "(n/a)" in table and "(0)" not in table
    summary = json.loads((out / "summary.json").read_text())
    for figures in summary["strategies"].values():
        assert figures["capViolationSecondsAfterConvergence"] is None and figures["withinCapPercentAfterConvergence"] is None
        assert figures["secondsAfterConvergence"] == 0
    assert summary["notices"] == [line.removeprefix("powercap simulate: note: ") for line in notes]


def test_the_readmes_shorter_run_names_the_cap_change_it_leaves_out() -> None:
    """README: `scripts/demo.sh --duration 300 --seed 2`; the demand-response cut is at 300 s."""
    scenario = load_scenario(default_scenario_text(), duration_s=300, seed=2)
    assert run_notices(scenario) == [
        "the cap change at 300 s (inference/chat -> 4800 W) is past the end of a 300-s run: not simulated"
    ]
    assert run_notices(load_scenario(default_scenario_text())) == []


def test_without_matplotlib_the_table_and_summary_are_written_and_the_missing_extra_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The programs' images leave matplotlib out; simulate there still runs, and says why no plots."""
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib(.anything) -> ImportError
    monkeypatch.delitem(sys.modules, "powercap.simulation.plots", raising=False)
    out = tmp_path / "results"
    assert main(["simulate", "--duration", "30", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert "powercap simulate: no plots: matplotlib is not installed (pip install 'powercap[simulate]')" in stderr
    assert "powercap" in stdout and "plots:" not in stdout
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "summary.json"]
    assert "no plots: matplotlib is not installed" in (out / "report.html").read_text()


def test_a_run_replaces_the_previous_one_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No plot of an earlier run survives beside a newer summary.json."""
    out = tmp_path / "results"
    out.mkdir()
    for name in ("summary.json", "throughput.png", "racks.png"):
        (out / name).write_text("an earlier run")
    assert main(["simulate", "--duration", "20", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"summary.json", "report.html", "services.png", "service-power.png", "racks.png", "throughput.png"}
    assert all((out / name).read_bytes() != b"an earlier run" for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_a_folder_holding_other_files_is_not_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out . by mistake must not cost the user their files."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "summary.json").write_text("an earlier run")
    assert main(["simulate", "--duration", "20", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert f"--out {tmp_path}: holds files that powercap simulate did not write (notes.txt)" in captured.err
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "summary.json"]


def test_a_scenario_file_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = yaml.safe_load(default_scenario_text())
    document["name"] = "my-cluster"
    document["events"] = []
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(document))
    assert main(["simulate", "--scenario", str(scenario), "--duration", "20", "--out", str(tmp_path / "o")]) == 0
    assert "scenario my-cluster:" in capsys.readouterr().out


def test_a_bad_scenario_exits_2_listing_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = yaml.safe_load(default_scenario_text())
    document["racks"][0]["maxPower"] = -5
    document["services"][1]["replicas"] = "many"
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(document))
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 2
    stderr = capsys.readouterr().err
    assert f"{scenario}: racks[0].maxPower: must be greater than 0" in stderr
    assert f"{scenario}: services[1].replicas: must be an integer, not a string" in stderr
    assert f"{scenario}: 2 problems; see docs/simulator.md for the format" in stderr
    assert not (tmp_path / "o").exists()
    document["services"][1]["replicas"] = 2
    scenario.write_text(yaml.safe_dump(document))
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 2
    assert f"{scenario}: 1 problem; see docs/simulator.md for the format" in capsys.readouterr().err


def test_a_missing_scenario_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--scenario", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: error: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--duration", "0"], ["--duration", "abc"], ["--duration", "1e9"], ["--seed", "-1"]], ids=str,
)
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["simulate", *argv])
    assert raised.value.code == 2


@pytest.mark.parametrize("where", ["a-file", "a-file/below"])
def test_an_output_directory_that_cannot_be_made_stops_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str,
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    started = time.perf_counter()
    assert main(["simulate", "--duration", "60", "--out", str(tmp_path / where)]) == 2
    assert time.perf_counter() - started < 1.0  # refused before simulating, not after
    captured = capsys.readouterr()
    assert f"--out {tmp_path / where}: exists and is not a directory" in captured.err
    assert captured.out == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_redraws_one_line_on_a_terminal() -> None:
    stream = Terminal()
    bar = ProgressBar(stream, strategies=2)
    for fraction in (0.5, 1.0):
        bar.update("no-capping", fraction)
    bar.update("powercap", 0.5)
    bar.finish()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    assert "75.0%" in text and "powercap" in text


def as_from_a_terminal() -> None:
    """Ctrl-C's SIGINT as a shell's foreground job gets it: a suite started in the background
    (``cmd &`` in a script) passes SIGINT ignored to its children, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


PREVIOUS_RUN = {"summary.json": "{\"previous\": true}\n", "throughput.png": "an earlier plot"}


@pytest.mark.parametrize(
    "after_line",
    [
        pytest.param("simulated no-capping", id="during-the-simulation"),
        pytest.param("powercap simulate: writing into", id="while-importing-matplotlib-and-writing"),
    ],
)
def test_ctrl_c_exits_130_keeping_the_previous_run_whole(tmp_path: Path, after_line: str) -> None:
    """A real SIGINT (what Ctrl-C sends) to `powercap simulate` once it has printed ``after_line``."""
    out = tmp_path / "results"
    out.mkdir()
    for name, text in PREVIOUS_RUN.items():
        (out / name).write_text(text)
    script = Path(sys.executable).parent / "powercap"
    process = subprocess.Popen(
        [str(script), "simulate", "--duration", "120", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=as_from_a_terminal,
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(after_line):
            process.send_signal(signal.SIGINT)
            break
    stdout, rest = process.communicate(timeout=120)
    stderr_lines = "".join(seen + [rest]).splitlines()
    assert process.returncode == 130, "\n".join(stderr_lines)
    assert stderr_lines[-1] == f"powercap simulate: interrupted; nothing written; {out} keeps the previous run"
    assert "Traceback" not in "\n".join(stderr_lines)
    assert {p.name: p.read_text() for p in out.iterdir()} == PREVIOUS_RUN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # the partial folder is gone


def test_ctrl_c_before_any_previous_run_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out" / "simulation"
    script = Path(sys.executable).parent / "powercap"
    process = subprocess.Popen(
        [str(script), "simulate", "--duration", "120", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=as_from_a_terminal,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("simulated no-capping"):
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130
    assert rest.splitlines()[-1] == f"powercap simulate: interrupted; nothing written; {out} was not created"
    assert list(tmp_path.iterdir()) == []
