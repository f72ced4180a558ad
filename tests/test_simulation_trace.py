"""Recorded traffic: trace files (Azure LLM inference format, rate samples) replayed by the simulator."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from powercap.commands import main
from powercap.simulation.scenario import ScenarioError, default_scenario_text, load_scenario, run_notices, scenario_from_document
from powercap.simulation.tracefile import RecordedTokens, TraceError, parse_azure_llm, parse_rate, parse_trace
from powercap.simulation.workload import build_trace, overload_notices

from .conftest import REPO_ROOT

# The head of AzureLLMInferenceTrace_conv.csv's layout: 7 fractional digits, no zone.
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def azure_rows(rows: list[tuple[float, int]], start: str = "2023-11-16 18:15:46") -> str:
    """An Azure-format CSV with requests at ``start`` + seconds, 7 fractional digits as published."""
    from datetime import datetime, timedelta

    origin = datetime.fromisoformat(start)
    lines = [AZURE_HEADER.rstrip("\n")]
    for offset_s, generated in rows:
        moment = origin + timedelta(seconds=offset_s)
        lines.append(f"{moment.strftime('%Y-%m-%d %H:%M:%S.%f')}0,{1000 + generated},{generated}")
    return "\n".join(lines) + "\n"


def test_azure_requests_are_summed_per_second_from_the_first_timestamp() -> None:
    text = azure_rows([(0.2, 10), (0.9, 5), (2.5, 100), (1.3, 7)])  # unsorted, as merged files can be
    recorded = parse_azure_llm(text.splitlines(keepends=True))
    assert recorded.per_second == (15.0, 7.0, 100.0)  # seconds [0.2, 1.2), [1.2, 2.2), [2.2, 3.2)
    assert recorded.requests == 4
    assert recorded.total_tokens == 122
    assert recorded.duration_s == 3


def test_azure_columns_are_found_by_name_and_seconds_may_be_numbers() -> None:
    text = "\ufeffGeneratedTokens,Other,TIMESTAMP\n3,x,10.5\n4,y,11.7\n\n"
    assert parse_azure_llm(text.splitlines(keepends=True)).per_second == (3.0, 4.0)


def test_tokens_between_integrates_any_window() -> None:
    recorded = RecordedTokens(per_second=(10.0, 20.0, 30.0), requests=3)
    assert recorded.tokens_between(0, 3) == 60
    assert recorded.tokens_between(0.5, 1.5) == pytest.approx(5 + 10)
    assert recorded.tokens_between(2.5, 10) == pytest.approx(15)  # nothing arrives after the end
    assert recorded.tokens_between(-5, 0) == 0


def test_rate_samples_are_interpolated() -> None:
    recorded = parse_rate("timeS,tokensPerSecond\n100,1000\n110,2000\n130,2000\n".splitlines(keepends=True))
    assert recorded.duration_s == 30
    assert recorded.per_second[0] == pytest.approx(1050)  # the middle of the first second
    assert recorded.per_second[9] == pytest.approx(1950)
    assert recorded.per_second[20:] == (2000.0,) * 10
    assert recorded.total_tokens == pytest.approx(10 * 1500 + 20 * 2000)


@pytest.mark.parametrize(
    "text, trace_format, message",
    [
        ("", "azure-llm", "empty file; the header must name TIMESTAMP, GeneratedTokens"),
        (AZURE_HEADER, "azure-llm", "no requests after the header"),
        ("time,tokens\n1,2\n", "azure-llm", "line 1: the header has no column TIMESTAMP, GeneratedTokens"),
        (AZURE_HEADER + "2023-11-16 18:15:46.0,1,2\nyesterday,1,2\n", "azure-llm", "line 3: TIMESTAMP 'yesterday' is neither a date-time"),
        (AZURE_HEADER + "1.0,10,-3\n", "azure-llm", "line 2: GeneratedTokens -3 is negative"),
        (AZURE_HEADER + "1.0,10,3\n2023-11-16 18:15:46.0,1,2\n", "azure-llm", "line 3: TIMESTAMP '2023-11-16 18:15:46.0': earlier rows use the other kind"),
        (AZURE_HEADER + "2023-11-16 25:15:46.0,1,2\n", "azure-llm", "line 2: TIMESTAMP '2023-11-16 25:15:46.0' is not a valid date-time"),
        (AZURE_HEADER + "1.0,10,many\n", "azure-llm", "line 2: GeneratedTokens 'many' is not a number"),
        (AZURE_HEADER + "1.0,10,nan\n", "azure-llm", "line 2: GeneratedTokens 'nan' is not a finite number"),
        (AZURE_HEADER + "1.0,10\n", "azure-llm", "line 2: 2 fields, the header has 3"),
        (AZURE_HEADER + "2023-11-16T18:15:46Z,1,2\n2023-11-16 18:15:47,1,2\n", "azure-llm", "line 3: TIMESTAMP '2023-11-16 18:15:47' has a time zone"),
        (AZURE_HEADER + "0,1,2\n5000000,1,2\n", "azure-llm", "line 3: the trace spans more than 31 days, the most that can be replayed"),
        ("timeS,tokensPerSecond\n5,10\n", "rate", "needs at least two samples"),
        ("timeS,tokensPerSecond\n5,10\n5,20\n", "rate", "line 3: timeS 5 is not after the previous sample's 5"),
        ("timeS,tokensPerSecond\n5,10\n6,inf\n", "rate", "line 3: tokensPerSecond 'inf' is not a finite number"),
        ("timeS,tokensPerSecond\n5,10\n6,20\n", "jsonl", 'unknown format "jsonl"'),
        # sums of such values are infinite: the run would offer inf tokens and summary.json say NaN
        (AZURE_HEADER + "1.0,10,3\n2.0,10,1e308\n", "azure-llm", "line 3: GeneratedTokens 1e308 is more than 1e+18"),
        (AZURE_HEADER + "1.0,10,9e17\n2.0,10,9e17\n", "azure-llm", "line 3: GeneratedTokens 9e17: the trace's tokens add up to more than 1e+18"),
        ("timeS,tokensPerSecond\n0,1e300\n6,20\n", "rate", "line 2: tokensPerSecond 1e300 is more than 1e+18"),
        ("timeS,tokensPerSecond\n0,1e17\n60,1e17\n", "rate", "line 3: tokensPerSecond 1e17: the trace's tokens add up to more than 1e+18"),
        # the 2024 files' zone is written without a space; one with a space is named
        (AZURE_HEADER + "2024-05-10 00:00:00.009930 +00:00,1,2\n", "azure-llm", "line 2: TIMESTAMP '2024-05-10 00:00:00.009930 +00:00' is neither"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 12 else None,
)
def test_a_bad_trace_names_its_line(text: str, trace_format: str, message: str) -> None:
    with pytest.raises(TraceError) as raised:
        parse_trace(text.splitlines(keepends=True), trace_format)
    assert message in str(raised.value)


def traced_document(trace: dict[str, Any], duration_s: float = 60) -> dict[str, Any]:
    """The built-in scenario with chat replaying ``trace`` instead of its daily shape."""
    document = yaml.safe_load(default_scenario_text())
    document["durationS"] = duration_s
    document["events"] = []
    document["workload"]["bursts"] = [{"service": "chat", "atS": 10, "durationS": 5, "factor": 2}]
    document["workload"]["randomBursts"] = {"count": 0}
    chat = document["services"][0]
    del chat["peakTokensS"], chat["dailyShape"]
    chat["trace"] = trace
    return document


def test_the_replay_offers_exactly_the_traces_tokens_of_the_played_window() -> None:
    # 300 s of trace, one request per second carrying (second + 1) tokens x 100
    text = azure_rows([(k + 0.5, (k + 1) * 100) for k in range(300)])
    document = traced_document({"file": "conv.csv", "startS": 40, "speedup": 2.5, "scale": 3})
    scenario = scenario_from_document(document, read_trace=lambda name: {"conv.csv": text}[name].splitlines(keepends=True))
    series = build_trace(scenario).per_second["chat"]
    recorded = parse_azure_llm(text.splitlines(keepends=True))
    for second in (0, 5, 33, 59):
        window_start = 40 + 2.5 * second
        expected = 3 * recorded.tokens_between(window_start, window_start + 2.5)
        burst = 2 if 10 <= second < 15 else 1
        assert series[second] == pytest.approx(expected * burst)
    # over the run, outside the burst: every token of trace seconds [40, 190) once, times scale
    unburst = math.fsum(series[s] for s in range(60) if not 10 <= s < 15)
    burst_tokens = math.fsum(series[s] for s in range(10, 15)) / 2
    assert unburst + burst_tokens == pytest.approx(3 * recorded.tokens_between(40, 190))
    # the other services keep their daily shapes
    assert min(build_trace(scenario).per_second["code"]) > 0


def test_a_scenario_names_every_trace_problem() -> None:
    document = traced_document({"file": "short.csv", "speedup": 10})
    code = document["services"][1]
    code["trace"] = {"file": "missing.csv"}
    batch = document["services"][2]
    del batch["peakTokensS"]
    files = {"short.csv": azure_rows([(0, 5), (100, 5)])}

    def read(name: str) -> list[str]:
        if name not in files:
            raise FileNotFoundError(name)
        return files[name].splitlines(keepends=True)

    with pytest.raises(ScenarioError) as raised:
        scenario_from_document(document, read_trace=read)
    shown = [str(problem) for problem in raised.value.problems]
    assert "services[1].peakTokensS: cannot be used with trace (the trace gives the traffic)" in shown
    assert "services[1].dailyShape: cannot be used with trace (the trace gives the traffic)" in shown
    assert "services[2].peakTokensS: is required (or trace, to replay recorded traffic)" in shown
    assert "services[1].trace.file: missing.csv: no such file (relative to the scenario file)" in shown
    assert (
        "services[0].trace: the trace covers 101 s, and a 60-s run from startS 0 at speedup 10 needs 600 s of it; "
        "durationS 10 fits, or lower speedup or startS" in shown
    )


def test_without_a_reader_a_trace_is_refused() -> None:
    with pytest.raises(ScenarioError) as raised:
        scenario_from_document(traced_document({"file": "conv.csv"}))
    assert [str(p) for p in raised.value.problems] == [
        "services[0].trace.file: trace files are read relative to a scenario file; run with --scenario FILE"
    ]


def test_trace_fields_are_checked_by_the_schema() -> None:
    with pytest.raises(ScenarioError) as raised:
        scenario_from_document(traced_document({"file": "conv.csv", "format": "csv", "speedup": 0, "sacle": 2}))
    shown = "\n".join(str(p) for p in raised.value.problems)
    assert "services[0].trace.format: unsupported value 'csv'; must be one of: azure-llm, rate" in shown
    assert "services[0].trace.speedup: must be greater than 0" in shown
    assert "services[0].trace.sacle" in shown and "did you mean scale" in shown


def test_simulate_replays_a_trace_file_next_to_the_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "conv.csv").write_text(azure_rows([(k / 20, 60) for k in range(20 * 120)]))
    document = traced_document({"file": "traces/conv.csv", "speedup": 2}, duration_s=40)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    assert main(["simulate", "--scenario", str(scenario), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "chat: replays traces/conv.csv (azure-llm, 120 s, 144,000 tokens) from 0 s at 2x, tokens x 1" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["traces"]["chat"]["traceTokens"] == 144000
    offered = summary["strategies"]["static-split"]["services"]["chat"]["offeredTokensPerSecond"]
    # 1200 tokens/s of trace at 2x, doubled for the 5-s burst: (35 x 2400 + 5 x 4800) / 40
    assert offered == pytest.approx((35 * 2400 + 5 * 4800) / 40, rel=0.02)


def test_a_duration_longer_than_the_trace_exits_2_saying_which_duration_fits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "conv.csv").write_text(azure_rows([(k, 100) for k in range(100)]))
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(traced_document({"file": "conv.csv"}, duration_s=50)))
    assert main(["simulate", "--scenario", str(scenario), "--duration", "200", "--out", str(tmp_path / "o")]) == 2
    assert (
        f"{scenario}: services[0].trace: the trace covers 100 s, and a 200-s run from startS 0 at speedup 1 "
        "needs 200 s of it; --duration 100 fits, or lower speedup or startS" in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_duration_on_the_command_line_fixes_a_file_whose_duration_the_trace_cannot_fill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal tells the user to shorten the run; --duration does, before the check."""
    (tmp_path / "conv.csv").write_text(azure_rows([(k, 100) for k in range(100)]))
    scenario = write_scenario(tmp_path, {"file": "conv.csv", "speedup": 4}, duration_s=60)
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 2
    assert "durationS 25 fits" in capsys.readouterr().err
    assert main(["simulate", "--scenario", str(scenario), "--duration", "25", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["scenario"]["durationS"] == 25


def test_without_durationS_the_run_is_as_long_as_the_trace_plays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "conv.csv").write_text(azure_rows([(k, 100) for k in range(100)]))
    document = traced_document({"file": "conv.csv", "startS": 10, "speedup": 4})
    del document["durationS"]
    document["events"] = [{"atS": 30, "policy": "inference/chat", "powerCapLimit": 5000}]  # past the 22-s run
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(document))
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "22 s simulated" in captured.out  # (100 - 10) / 4 = 22.5 trace-filled seconds
    assert "note: the cap change at 30 s (inference/chat -> 5000 W) is past the end of a 22-s run: not simulated" in captured.err


def test_peak_utilisation_scales_the_trace_to_the_services_capacity(tmp_path: Path) -> None:
    """peakUtilisation 0.5: the run's busiest minute offers half of what chat's 10 pods x 2
    H200-like GPUs serve with no cap (3000 tokens/s x 0.75 decode each: 45,000 tokens/s)."""
    rows = [(k + 0.5, 100 if k < 100 else 400) for k in range(400)]  # quiet, then 4x busier
    text = azure_rows(rows)
    document = traced_document({"file": "conv.csv", "speedup": 2, "peakUtilisation": 0.5}, duration_s=150)
    document["workload"]["bursts"] = []
    scenario = scenario_from_document(document, read_trace=lambda name: text.splitlines(keepends=True))
    chat = scenario.service("chat")
    assert chat.trace is not None and chat.trace.peak_utilisation == 0.5
    series = build_trace(scenario).per_second["chat"]
    assert max(series) == pytest.approx(0.5 * 45_000, rel=1e-6)  # the busy part: 800 tokens/s of trace
    assert chat.trace.scale == pytest.approx(22_500 / 800)


def test_scale_and_peak_utilisation_exclude_each_other() -> None:
    document = traced_document({"file": "conv.csv", "scale": 2, "peakUtilisation": 0.8})
    with pytest.raises(ScenarioError) as raised:
        scenario_from_document(document, read_trace=lambda name: azure_rows([(0, 1), (5, 1)]).splitlines(keepends=True))
    assert "services[0].trace.scale: cannot be used with peakUtilisation (which chooses the scale); set one of them" in [
        str(p) for p in raised.value.problems
    ]


def test_traffic_beyond_what_a_service_serves_uncapped_is_named_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "conv.csv").write_text(azure_rows([(k + 0.5, 1000) for k in range(100)]))
    scenario = write_scenario(tmp_path, {"file": "conv.csv", "scale": 90})  # 90,000 tokens/s for 45,000
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    note = err.index("powercap simulate: note: chat: its run offers 90,000 tokens/s, 2.0x what its 10 pods serve with no cap "
                     "(45,000 tokens/s): every strategy will drop tokens; set trace.peakUtilisation")
    assert note < err.index("simulated no-capping")


def write_scenario(tmp_path: Path, trace: dict[str, Any], duration_s: float = 20, bursts: bool = False) -> Path:
    document = traced_document(trace, duration_s=duration_s)
    if not bursts:
        document["workload"]["bursts"] = []
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(document))
    return scenario


@pytest.mark.parametrize(
    "content, message",
    [
        # a Latin-1 export: the line and the byte, not only "not UTF-8"
        (AZURE_HEADER.encode() + b"0,1,2\n1,1,2\n2,1,3\xe9\n", "conv.csv: line 4: not UTF-8 text (byte 0xe9 at column 6)"),
        (AZURE_HEADER.encode() + b"0,1,2\n1,1,1e308\n", "conv.csv: line 3: GeneratedTokens 1e308 is more than 1e+18"),
        (b"\x7fELF\x02\x01\x01\x00\xff\xfe\n", "conv.csv: line 1: not UTF-8 text (byte 0xff at column 9)"),
    ],
    ids=["latin-1", "huge", "binary"],
)
def test_simulate_names_the_line_of_an_unusable_file_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    (tmp_path / "conv.csv").write_bytes(content)
    scenario = write_scenario(tmp_path, {"file": "conv.csv"})
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{scenario}: services[0].trace.file: {message}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "trace, message",
    [
        # a higher speedup plays more of the trace, so the advice is to lower it
        ({"speedup": 10}, "the trace covers 100 s, and a 20-s run from startS 0 at speedup 10 needs 200 s of it; "
                          "durationS 10 fits, or lower speedup or startS"),
        ({"speedup": 3600}, "the trace covers 100 s, and a 20-s run from startS 0 at speedup 3600 needs 72000 s of it; "
                            "lower speedup or startS"),
        ({"startS": 100}, "startS 100 is at or after the end of the trace, which covers 100 s"),
        ({"startS": 5000, "speedup": 0.5}, "startS 5000 is at or after the end of the trace, which covers 100 s"),
    ],
)
def test_a_trace_too_short_for_the_run_says_how_to_fit_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trace: dict[str, Any], message: str
) -> None:
    (tmp_path / "conv.csv").write_text(azure_rows([(k, 100) for k in range(100)]))
    scenario = write_scenario(tmp_path, {"file": "conv.csv", **trace})
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 2
    assert f"{scenario}: services[0].trace: {message}" in capsys.readouterr().err


def test_a_scale_too_large_to_compute_with_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "conv.csv").write_text(azure_rows([(k, 100) for k in range(100)]))
    scenario = write_scenario(tmp_path, {"file": "conv.csv", "scale": 1e307})
    assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "o")]) == 2
    assert (
        f"{scenario}: services[0].trace.scale: 1e+307 times the trace's busiest second (100 tokens) is too large to compute with"
        in capsys.readouterr().err
    )


def test_the_run_offers_exactly_the_played_windows_tokens_and_repeats(tmp_path: Path) -> None:
    """summary.json's offered tokens are the file's tokens of the played window, times scale,
    even for bursty request-level traffic (a spike in the very first second), and a second
    run gives the same figures."""
    import random

    rng = random.Random(3)
    rows = [(k + rng.random(), rng.randint(1, 2000)) for k in range(100) for _ in range(40 if k % 7 == 0 else 1)]
    (tmp_path / "conv.csv").write_text(azure_rows(rows))
    scenario = write_scenario(tmp_path, {"file": "conv.csv", "startS": 7, "speedup": 1.5, "scale": 2})
    recorded = parse_azure_llm((tmp_path / "conv.csv").read_text().splitlines(keepends=True))
    expected = 2 * recorded.tokens_between(7, 7 + 20 * 1.5)
    figures = []
    for out in ("a", "b"):
        assert main(["simulate", "--scenario", str(scenario), "--out", str(tmp_path / out)]) == 0
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        for strategy in summary["strategies"].values():
            assert strategy["services"]["chat"]["offeredTokensPerSecond"] * 20 == pytest.approx(expected, rel=1e-6)
            strategy.pop("wallSeconds"), strategy.pop("speedVsRealTime")
        figures.append(summary["strategies"])
    assert figures[0] == figures[1]


@pytest.mark.parametrize(
    "error, message",
    [
        (PermissionError(13, "Permission denied"), "services[0].trace.file: conv.csv: Permission denied"),
        (IsADirectoryError(21, "Is a directory"), "services[0].trace.file: conv.csv: Is a directory"),
        (FileNotFoundError(2, "No such file"), "services[0].trace.file: conv.csv: no such file (relative to the scenario file)"),
    ],
    ids=["unreadable", "directory", "missing"],
)
def test_a_trace_file_that_cannot_be_opened_is_named(error: OSError, message: str) -> None:
    def read(name: str) -> list[str]:
        raise error

    with pytest.raises(ScenarioError) as raised:
        scenario_from_document(traced_document({"file": "conv.csv"}), read_trace=read)
    assert [str(p) for p in raised.value.problems] == [message]


AZURE_TRACE = REPO_ROOT.parent / "shared" / "data" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"


def docs_recipe_document() -> dict[str, Any]:
    """docs/simulator.md's recipe: the built-in scenario without durationS, chat replaying the
    Azure conversation trace at speedup 6 scaled to peakUtilisation 0.8."""
    document = yaml.safe_load(default_scenario_text())
    del document["durationS"]
    chat = document["services"][0]
    del chat["peakTokensS"], chat["dailyShape"]
    chat["trace"] = {"file": "traces/AzureLLMInferenceTrace_conv.csv", "speedup": 6, "peakUtilisation": 0.8}
    return document


@pytest.fixture
def azure_trace() -> Path:
    if not AZURE_TRACE.is_file():
        pytest.skip(f"the Azure LLM inference trace is not at {AZURE_TRACE} (../shared/data/azure-llm-2023/ beside the "
                    "repository): the docs' recipe for recorded traffic is NOT tested")
    return AZURE_TRACE


def test_the_docs_recipe_replays_the_real_azure_trace_on_the_first_try(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], azure_trace: Path
) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / azure_trace.name).symlink_to(azure_trace)
    scenario = tmp_path / "my.yaml"
    scenario.write_text(yaml.safe_dump(docs_recipe_document()))
    # the whole run: as long as an hour of trace plays at 6x (3503 s of requests: 583 s)
    loaded = load_scenario(scenario.read_text(), read_trace=lambda name: (tmp_path / name).open(encoding="utf-8"))
    assert loaded.duration_s == 583
    assert run_notices(loaded) == [] and overload_notices(loaded, build_trace(loaded)) == []
    # a short window of it, end to end
    assert main(["simulate", "--scenario", str(scenario), "--duration", "30", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "chat: replays traces/AzureLLMInferenceTrace_conv.csv (azure-llm, 3503 s, 4,088,665 tokens) from 0 s at 6x" in captured.out
    assert "(peakUtilisation 0.8)" in captured.out
    assert "note: chat" not in captured.err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    chat = summary["strategies"]["no-capping"]["services"]["chat"]
    assert 0 < chat["offeredTokensPerSecond"] <= 45_000  # 80 % of what 10 pods serve, and the random bursts


def test_the_recorded_traffic_benchmark_replays_the_docs_recipe(azure_trace: Path) -> None:
    """benchmarks/scenarios/azure-conv.yaml (issue 14, recorded traffic) is docs/simulator.md's recipe with
    the trace read from ../shared/data, and plays the whole hour without a notice."""
    path = REPO_ROOT / "benchmarks" / "scenarios" / "azure-conv.yaml"
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe = docs_recipe_document()
    assert (path.parent / document["services"][0]["trace"].pop("file")).resolve() == azure_trace.resolve()
    del recipe["services"][0]["trace"]["file"]
    assert {k: v for k, v in document.items() if k not in ("name", "description")} == \
        {k: v for k, v in recipe.items() if k not in ("name", "description")}
    loaded = load_scenario(path.read_text(encoding="utf-8"), read_trace=lambda name: (path.parent / name).open(encoding="utf-8"))
    assert loaded.duration_s == 583
    assert run_notices(loaded) == [] and overload_notices(loaded, build_trace(loaded)) == []
