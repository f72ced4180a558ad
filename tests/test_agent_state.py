"""The host state file: round trip, atomic replacement, corruption, unchanged content."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from nodeagent.state import StateFile
from powercap.agentplan import CapRecord

RECORD = CapRecord("GPU-a", cap_w=400, default_w=700, policy="inference/llama", ratio_offset_w=20, thermal_limit_w=380)


def test_round_trip_keeps_caps_and_control_state(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "powercap" / "agent-state.json"
    assert StateFile(path, "n1").save({"GPU-a": RECORD}) is True
    assert StateFile(path, "n1").load() == {"GPU-a": RECORD}
    document = json.loads(path.read_text())
    assert document["gpus"]["GPU-a"] == {
        "capW": 400, "defaultW": 700, "policy": "inference/llama", "ratioOffsetW": 20, "thermalLimitW": 380,
    }


def test_written_only_on_change_and_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path, "n1")
    assert state.save({"GPU-a": RECORD})
    assert not state.save({"GPU-a": RECORD})
    assert state.save({})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_loaded_content_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    StateFile(path, "n1").save({"GPU-a": RECORD})
    reloaded = StateFile(path, "n1")
    assert not reloaded.save(reloaded.load())


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param('{"version": 99, "gpus": {}}', id="unknown-version"),
        pytest.param('{"version": 1, "gpus": {"GPU-a": {"capW": "many"}}}', id="bad-record"),
        # each of these stopped the agent at start-up (OverflowError, RecursionError) or
        # would have loaded a cap of inf or nan
        pytest.param('{"version": 1, "gpus": {"GPU-a": {"capW": 1%s, "defaultW": 700, "policy": "n/p"}}}' % ("0" * 400), id="cap-400-digits"),
        pytest.param('{"version": 1, "gpus": {"GPU-a": {"capW": NaN, "defaultW": 700, "policy": "n/p"}}}', id="cap-nan"),
        pytest.param('{"version": 1, "gpus": {"GPU-a": {"capW": 1e400, "defaultW": 700, "policy": "n/p"}}}', id="cap-infinite"),
        pytest.param("[" * 100000, id="nested-past-the-stack"),
    ],
)
def test_corrupt_file_reads_as_empty_and_says_so(tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with caplog.at_level(logging.ERROR, logger="nodeagent.state"):
        assert StateFile(path, "n1").load() == {}
    assert "state file corrupt" in caplog.text


def test_missing_file_is_a_first_start(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "absent.json", "n1").load() == {}


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path, "n1")
    state.save({"GPU-a": RECORD})

    def broken_replace(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("nodeagent.state.os.replace", broken_replace)
    with pytest.raises(OSError):
        state.save({})
    assert StateFile(path, "n1").load() == {"GPU-a": RECORD}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
