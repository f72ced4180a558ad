"""``powercap simulate`` end to end: the table, summary.json, the plots, the exit codes."""

from __future__ import annotations

import io
import time
import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

from powercap.commands import main
from powercap.simulation.cli import ProgressBar
from powercap.simulation.scenario import default_scenario_text

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
    assert f"plots: {out / 'service-power.png'}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["durationS"] == 60 and summary["scenario"]["seed"] == 4
    assert set(summary["strategies"]) == {"no-capping", "static-split", "powercap"}
    assert summary["speedVsRealTime"] > 0
    for name in ("service-power.png", "racks.png", "throughput.png"):
        width, height = png_size(out / name)
        assert width >= 800 and height >= 500


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
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


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
    assert not (tmp_path / "o").exists()


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
