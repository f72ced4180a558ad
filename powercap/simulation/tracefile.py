"""Recorded traffic for a service: read a CSV trace into generated tokens per trace second.

Two formats (``services[].trace.format``):

- ``azure-llm``: one row per request, as the Azure LLM inference traces publish them
  (github.com/Azure/AzurePublicDataset, ``AzureLLMInferenceTrace_conv.csv`` and
  ``_code.csv``, the traces Splitwise and POLCA were evaluated on)::

      TIMESTAMP,ContextTokens,GeneratedTokens
      2023-11-16 18:15:46.6805900,4808,10

  ``TIMESTAMP`` is a date-time (any fraction of a second, no zone needed) or a number of
  seconds; rows need not be sorted. A request's generated tokens count as work arriving at
  its timestamp (the simulator's queues are fluid: work in tokens, served at the GPUs' rate).
- ``rate``: samples of a rate, as exported from Prometheus
  (``sum(rate(vllm:generation_tokens_total[1m]))``)::

      timeS,tokensPerSecond
      0,18250.5

  linear between samples, starting at the first sample's time.

Columns are found by their header names (others are ignored). The result is a
:class:`RecordedTokens`: tokens per whole trace second from the first timestamp, whose
:meth:`RecordedTokens.tokens_between` integrates it over any window (linear within a second),
so a replay can run faster or slower than the trace. Every error names its line.
Pure: the caller reads the file.
"""

from __future__ import annotations

import csv
import io
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import accumulate

from powercap.telemetry import parse_rfc3339

FORMATS = ("azure-llm", "rate")
AZURE_COLUMNS = ("TIMESTAMP", "GeneratedTokens")
RATE_COLUMNS = ("timeS", "tokensPerSecond")
MAX_TRACE_S = 31 * 86400
"""Longest trace read (a month): the per-second series of a longer one would not fit a laptop's memory well."""


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the line and what is wrong."""


@dataclass(frozen=True)
class RecordedTokens:
    """Generated tokens arriving in each whole second of a trace, from its first timestamp."""

    per_second: tuple[float, ...]
    requests: int
    cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)
    """``cumulative[k]``: tokens arrived before second k."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cumulative", (0.0, *accumulate(self.per_second)))

    @property
    def duration_s(self) -> float:
        return float(len(self.per_second))

    @property
    def total_tokens(self) -> float:
        return self.cumulative[-1]

    def tokens_between(self, start_s: float, end_s: float) -> float:
        """Tokens arriving in trace time [start_s, end_s), spread evenly within each second."""
        return self._arrived_before(end_s) - self._arrived_before(start_s)

    def _arrived_before(self, t_s: float) -> float:
        if t_s <= 0:
            return 0.0
        second = int(t_s)
        if second >= len(self.per_second):
            return self.cumulative[-1]
        return self.cumulative[second] + self.per_second[second] * (t_s - second)


def parse_trace(text: str, trace_format: str) -> RecordedTokens:
    """Parse a trace file's text; raises :class:`TraceError` naming the line."""
    if trace_format == "azure-llm":
        return parse_azure_llm(text)
    if trace_format == "rate":
        return parse_rate(text)
    raise TraceError(f'unknown format "{trace_format}"; formats: {", ".join(FORMATS)}')


def parse_azure_llm(text: str) -> RecordedTokens:
    rows = _rows(text, AZURE_COLUMNS)
    arrivals: list[tuple[float, float]] = []
    origin: datetime | None = None
    for line, fields in rows:
        moment, generated = fields
        seconds, origin = _seconds(moment, origin, line)
        arrivals.append((seconds, _count(generated, "GeneratedTokens", line)))
    if not arrivals:
        raise TraceError("no requests after the header")
    first = min(t for t, _ in arrivals)
    last = max(t for t, _ in arrivals)
    _check_length(last - first)
    per_second = [0.0] * (int(last - first) + 1)
    for t_s, tokens in arrivals:
        per_second[int(t_s - first)] += tokens
    return RecordedTokens(per_second=tuple(per_second), requests=len(arrivals))


def parse_rate(text: str) -> RecordedTokens:
    samples: list[tuple[float, float]] = []
    for line, (time_text, rate_text) in _rows(text, RATE_COLUMNS):
        t_s = _number(time_text, "timeS", line)
        rate = _count(rate_text, "tokensPerSecond", line)
        if samples and t_s <= samples[-1][0]:
            raise TraceError(f"line {line}: timeS {time_text} is not after the previous sample's {samples[-1][0]:g}")
        samples.append((t_s, rate))
    if len(samples) < 2:
        raise TraceError("needs at least two samples (a rate between two times)")
    first = samples[0][0]
    span_s = samples[-1][0] - first
    _check_length(span_s)
    times = [t - first for t, _ in samples]
    rates = [r for _, r in samples]
    # tokens in second k: the rate at its middle (samples are usually 15-60 s apart)
    per_second = tuple(_interpolate(times, rates, k + 0.5) for k in range(max(1, math.ceil(span_s))))
    return RecordedTokens(per_second=per_second, requests=0)


def _interpolate(times: Sequence[float], values: Sequence[float], t: float) -> float:
    i = bisect_right(times, t)
    if i == 0:
        return values[0]
    if i >= len(times):
        return values[-1]
    fraction = (t - times[i - 1]) / (times[i] - times[i - 1])
    return values[i - 1] + (values[i] - values[i - 1]) * fraction


def _rows(text: str, columns: Sequence[str]) -> list[tuple[int, list[str]]]:
    """``(line number, the named columns' fields)`` of every non-empty row after the header."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = next(reader, None)
        if header is None:
            raise TraceError(f"empty file; the header must name {', '.join(columns)}")
        names = [name.strip() for name in header]
        missing = [column for column in columns if column not in names]
        if missing:
            raise TraceError(f"line 1: the header has no column {', '.join(missing)}; it must name {', '.join(columns)} (it has: {', '.join(names)})")
        positions = [names.index(column) for column in columns]
        rows = []
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue
            if len(fields) <= max(positions):
                raise TraceError(f"line {reader.line_num}: {len(fields)} fields, the header has {len(names)}")
            rows.append((reader.line_num, [fields[p].strip() for p in positions]))
    except csv.Error as error:
        raise TraceError(f"line {reader.line_num}: not CSV: {error}") from None
    return rows


def _seconds(text: str, origin: datetime | None, line: int) -> tuple[float, datetime | None]:
    """Seconds of a TIMESTAMP (a date-time, measured from the first one read, or a number)."""
    try:
        return float(text), origin
    except ValueError:
        pass
    try:
        moment = parse_rfc3339(text.replace(" ", "T", 1))
    except ValueError:
        raise TraceError(f"line {line}: TIMESTAMP {text!r} is neither a date-time nor a number of seconds") from None
    if origin is None:
        origin = moment
    try:
        return (moment - origin).total_seconds(), origin
    except TypeError:  # one timestamp with a zone, another without
        raise TraceError(f"line {line}: TIMESTAMP {text!r} has a time zone and earlier ones do not (or the other way round)") from None


def _number(text: str, column: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"line {line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceError(f"line {line}: {column} {text!r} is not a finite number")
    return value


def _count(text: str, column: str, line: int) -> float:
    value = _number(text, column, line)
    if value < 0:
        raise TraceError(f"line {line}: {column} {text} is negative")
    return value


def _check_length(span_s: float) -> None:
    if span_s > MAX_TRACE_S:
        raise TraceError(f"spans {span_s / 86400:.1f} days; at most {MAX_TRACE_S // 86400} days can be replayed (cut the file)")
