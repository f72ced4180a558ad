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
Pure: the caller opens the file and passes its lines, read as a stream.
"""

from __future__ import annotations

import csv
import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import accumulate

from powercap.numeric import counted
from powercap.telemetry import parse_rfc3339

FORMATS = ("azure-llm", "rate")
AZURE_COLUMNS = ("TIMESTAMP", "GeneratedTokens")
RATE_COLUMNS = ("timeS", "tokensPerSecond")
MAX_TRACE_S = 31 * 86400
"""Longest trace read (a month): the per-second series of a longer one would not fit a laptop's memory well."""
MAX_TOKENS = 1e18
"""Most generated tokens a trace may hold (a month at a billion tokens/s is 2.7e15): a file
beyond it is broken, and sums of such values overflow to infinity."""


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


Lines = Iterable[str]
"""A trace file's lines (an open text file, or ``text.splitlines(keepends=True)``): read as a
stream, so a week of requests (the 2024 traces: 27 million rows, 1.1 GB) never sits in memory."""


def parse_trace(lines: Lines, trace_format: str) -> RecordedTokens:
    """Parse a trace's lines; raises :class:`TraceError` naming the line."""
    if trace_format == "azure-llm":
        return parse_azure_llm(lines)
    if trace_format == "rate":
        return parse_rate(lines)
    raise TraceError(f'unknown format "{trace_format}"; formats: {", ".join(FORMATS)}')


def parse_azure_llm(lines: Lines) -> RecordedTokens:
    """Requests summed per whole second, counted from the first row's timestamp (rows before
    it, in an unsorted file, count too)."""
    tokens_by_second: dict[int, float] = {}
    clock = _TimestampClock()
    requests = 0
    low = high = 0
    total = 0.0
    for line, (moment, generated) in _rows(lines, AZURE_COLUMNS):
        second = math.floor(clock.seconds(moment, line))
        count = _count(generated, "GeneratedTokens", line)
        if count > MAX_TOKENS:
            raise TraceError(f"line {line}: GeneratedTokens {generated} is more than {MAX_TOKENS:g}")
        tokens_by_second[second] = tokens_by_second.get(second, 0.0) + count
        total += count
        if total > MAX_TOKENS:
            raise TraceError(f"line {line}: GeneratedTokens {generated}: the trace's tokens add up to more than {MAX_TOKENS:g}")
        requests += 1
        if second < low or second > high:
            low, high = min(low, second), max(high, second)
            if high - low > MAX_TRACE_S:
                raise TraceError(f"line {line}: the trace spans more than {MAX_TRACE_S // 86400} days, the most that can be replayed (cut the file)")
    if not requests:
        raise TraceError("no requests after the header")
    per_second = tuple(tokens_by_second.get(second, 0.0) for second in range(low, high + 1))
    return RecordedTokens(per_second=per_second, requests=requests)


def parse_rate(lines: Lines) -> RecordedTokens:
    samples: list[tuple[float, float]] = []
    total = 0.0
    for line, (time_text, rate_text) in _rows(lines, RATE_COLUMNS):
        t_s = _number(time_text, "timeS", line)
        rate = _count(rate_text, "tokensPerSecond", line)
        if rate > MAX_TOKENS:
            raise TraceError(f"line {line}: tokensPerSecond {rate_text} is more than {MAX_TOKENS:g}")
        if samples and t_s <= samples[-1][0]:
            raise TraceError(f"line {line}: timeS {time_text} is not after the previous sample's {samples[-1][0]:g}")
        if samples and t_s - samples[0][0] > MAX_TRACE_S:
            raise TraceError(f"line {line}: the trace spans more than {MAX_TRACE_S // 86400} days, the most that can be replayed (cut the file)")
        if samples:
            total += (t_s - samples[-1][0]) * (rate + samples[-1][1]) / 2.0
            if total > MAX_TOKENS:
                raise TraceError(f"line {line}: tokensPerSecond {rate_text}: the trace's tokens add up to more than {MAX_TOKENS:g}")
        samples.append((t_s, rate))
    if len(samples) < 2:
        raise TraceError("needs at least two samples (a rate between two times)")
    first = samples[0][0]
    span_s = samples[-1][0] - first
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


def _rows(lines: Lines, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """``(line number, the named columns' fields)`` of every non-empty row after the header."""
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            raise TraceError(f"empty file; the header must name {', '.join(columns)}")
        names = [name.strip().lstrip("\ufeff") for name in header]
        missing = [column for column in columns if column not in names]
        if missing:
            raise TraceError(f"line 1: the header has no column {', '.join(missing)}; it must name {', '.join(columns)} (it has: {', '.join(names)})")
        positions = [names.index(column) for column in columns]
        last = max(positions)
        for fields in reader:
            if len(fields) <= last:
                if not any(field.strip() for field in fields):
                    continue
                raise TraceError(f"line {reader.line_num}: {counted(len(fields), 'field')}, the header has {len(names)}")
            yield reader.line_num, [fields[p].strip() for p in positions]
    except csv.Error as error:
        raise TraceError(f"line {reader.line_num}: not CSV: {error}") from None


_DATE_TIME = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(\.\d+)?(Z|z|[+-]\d\d:?\d\d)?")


class _TimestampClock:
    """Seconds of TIMESTAMPs from the first one: a number of seconds, or a date-time.

    Date-times are parsed once per distinct whole second (the fraction is added as a
    number): a trace has millions of rows but far fewer distinct seconds.
    """

    def __init__(self) -> None:
        self._origin: datetime | None = None
        self._first_number: float | None = None
        self._second_text = ""
        self._second_s = 0.0

    def seconds(self, text: str, line: int) -> float:
        match = _DATE_TIME.fullmatch(text)
        if match is None:
            try:
                value = _number(text, "TIMESTAMP", line)
            except TraceError:
                raise TraceError(f"line {line}: TIMESTAMP {text!r} is neither a date-time nor a number of seconds") from None
            if self._first_number is None:
                self._mixed_check(self._origin is not None, text, line)
                self._first_number = value
            return value - self._first_number
        self._mixed_check(self._first_number is not None, text, line)
        whole, fraction, zone = match.groups()
        second_text = whole + (zone or "")
        if second_text != self._second_text:
            self._second_s = self._whole_seconds(second_text, text, line)
            self._second_text = second_text
        return self._second_s + (float(fraction) if fraction else 0.0)

    @staticmethod
    def _mixed_check(mixed: bool, text: str, line: int) -> None:
        if mixed:
            raise TraceError(f"line {line}: TIMESTAMP {text!r}: earlier rows use the other kind (date-times and numbers of seconds cannot be mixed)")

    def _whole_seconds(self, second_text: str, text: str, line: int) -> float:
        try:
            moment = parse_rfc3339(second_text.replace(" ", "T", 1))
        except ValueError:
            raise TraceError(f"line {line}: TIMESTAMP {text!r} is not a valid date-time") from None
        if self._origin is None:
            self._origin = moment
        try:
            return (moment - self._origin).total_seconds()
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
