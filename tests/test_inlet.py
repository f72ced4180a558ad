"""Inlet temperature sources: hwmon by label, a plain file, none; specs checked up front."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from nodeagent.inlet import (
    FileInlet,
    HwmonInlet,
    InletConfigError,
    NoInlet,
    inlet_spec_argument,
    parse_inlet_spec,
)


def write_sensor(root: Path, chip: str, sensor: str, label: str, millidegrees: int) -> Path:
    (root / chip).mkdir(parents=True, exist_ok=True)
    (root / chip / f"{sensor}_label").write_text(label + "\n")
    (root / chip / f"{sensor}_input").write_text(f"{millidegrees}\n")
    return root / chip / f"{sensor}_input"


@pytest.fixture
def hwmon(tmp_path: Path) -> Path:
    """A BMC-like hwmon tree: CPU sensors, then the inlet on hwmon10 and a decoy on hwmon2."""
    write_sensor(tmp_path, "hwmon0", "temp1", "Package id 0", 61000)
    write_sensor(tmp_path, "hwmon2", "temp3", "Exhaust Temp", 41000)
    write_sensor(tmp_path, "hwmon10", "temp1", "Exhaust Temp", 39000)
    write_sensor(tmp_path, "hwmon10", "temp2", "Inlet Temp", 23500)
    (tmp_path / "hwmon10" / "name").write_text("ipmi\n")
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "expected_type", "expected_spec"),
    [
        pytest.param("hwmon:Inlet Temp", HwmonInlet, "hwmon:Inlet Temp", id="hwmon-label-spaces"),
        pytest.param("file:/run/inlet_c", FileInlet, "file:/run/inlet_c", id="file"),
        pytest.param("none", NoInlet, "none", id="none"),
        pytest.param(" NONE ", NoInlet, "none", id="none-any-case"),
    ],
)
def test_good_specs_select_a_source(spec: str, expected_type: type, expected_spec: str) -> None:
    source = parse_inlet_spec(spec)
    assert type(source) is expected_type
    assert source.spec == expected_spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("", "expected 'hwmon:", id="empty"),
        pytest.param("ipmi:Inlet Temp", "expected 'hwmon:", id="unknown-kind"),
        pytest.param("hwmon", "expected 'hwmon:", id="hwmon-without-colon"),
        pytest.param("hwmon:  ", "hwmon needs a sensor label", id="hwmon-blank-label"),
        pytest.param("file:relative/inlet", "file needs an absolute path", id="relative-file"),
        pytest.param("none:extra", "expected 'hwmon:", id="none-with-argument"),
    ],
)
def test_bad_specs_are_configuration_errors(spec: str, message: str) -> None:
    with pytest.raises(InletConfigError, match=message) as raised:
        parse_inlet_spec(spec)
    assert repr(spec) in str(raised.value)


def test_bad_spec_on_the_command_line_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="nodeagent")
    parser.add_argument("--inlet", type=inlet_spec_argument, default="none")
    with pytest.raises(SystemExit):
        parser.parse_args(["--inlet", "ipmi:Inlet"])
    assert "inlet spec 'ipmi:Inlet': expected" in capsys.readouterr().err


def test_hwmon_reads_the_labelled_sensor_in_degrees(hwmon: Path) -> None:
    assert parse_inlet_spec("hwmon:Inlet Temp", hwmon_root=hwmon).read_c() == 23.5


def test_hwmon_picks_the_first_chip_in_numeric_order(hwmon: Path) -> None:
    source = HwmonInlet("Exhaust Temp", root=hwmon)
    assert source.find_input() == hwmon / "hwmon2" / "temp3_input"
    assert source.read_c() == 41.0


def test_hwmon_follows_the_sensor_value(hwmon: Path) -> None:
    source = HwmonInlet("Inlet Temp", root=hwmon)
    source.read_c()
    (hwmon / "hwmon10" / "temp2_input").write_text("31250\n")
    assert source.read_c() == 31.25


def test_missing_hwmon_sensor_reads_none_and_warns_once(
    hwmon: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = HwmonInlet("Ambient", root=hwmon)
    with caplog.at_level(logging.WARNING, logger="nodeagent.inlet"):
        assert [source.read_c(), source.read_c()] == [None, None]
    assert len(caplog.records) == 1
    assert "Ambient" in getattr(caplog.records[0], "reason", "")


def test_hwmon_renumbered_after_a_driver_reload_is_found_again(hwmon: Path) -> None:
    source = HwmonInlet("Inlet Temp", root=hwmon)
    assert source.read_c() == 23.5
    (hwmon / "hwmon10").rename(hwmon / "hwmon11")
    assert source.read_c() is None
    assert source.read_c() == 23.5


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("23.5\n", 23.5, id="decimal"),
        pytest.param("  -5 ", -5.0, id="negative-padded"),
        pytest.param("23500\n", None, id="millidegrees-implausible"),
        pytest.param("warm\n", None, id="not-a-number"),
        pytest.param("", None, id="empty"),
    ],
)
def test_file_source_reads_degrees(tmp_path: Path, content: str, expected: float | None) -> None:
    path = tmp_path / "inlet_c"
    path.write_text(content)
    assert parse_inlet_spec(f"file:{path}").read_c() == expected


def test_file_source_recovers_when_the_file_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "inlet_c"
    source = FileInlet(path)
    with caplog.at_level(logging.INFO, logger="nodeagent.inlet"):
        assert source.read_c() is None
        path.write_text("27\n")
        assert source.read_c() == 27.0
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_none_source_reads_none() -> None:
    assert NoInlet().read_c() is None
