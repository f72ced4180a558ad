"""Reading recorded traffic (``services[].trace``): rows per second and memory.

    .venv/bin/python benchmarks/tracefile.py [--rows 2000000]   (prints markdown)

Writes an Azure-LLM-format CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``, timestamps
with 7 fractional digits as published, about 5.4 requests a second, the 2023 conversation
trace's rate, so 2 million rows span about 4 days) to a temporary directory, then reads it
as ``powercap simulate`` does (a stream of lines from the open file) and reports the wall
time, rows per second and the process's peak RSS growth. The 2024 week-long traces have
16.8 and 27.3 million rows.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine  # noqa: E402
from powercap.simulation.tracefile import parse_azure_llm  # noqa: E402


def write_trace(path: Path, rows: int, seed: int = 1) -> float:
    """An Azure-format trace of ``rows`` requests; returns its span in seconds."""
    rng = random.Random(seed)
    origin = datetime(2024, 5, 10)
    t_s = 0.0
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("TIMESTAMP,ContextTokens,GeneratedTokens\r\n")
        for _ in range(rows):
            t_s += rng.expovariate(5.4)
            stamp = (origin + timedelta(seconds=t_s)).strftime("%Y-%m-%d %H:%M:%S.%f")
            out.write(f"{stamp}0,{rng.randint(100, 8000)},{rng.randint(1, 900)}\r\n")
    return t_s


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trace.csv"
        span_s = write_trace(path, args.rows)
        size_mb = path.stat().st_size / 1e6
        before_mib = peak_rss_mib()
        started = time.perf_counter()
        with path.open(encoding="utf-8", newline="") as lines:
            recorded = parse_azure_llm(lines)
        wall_s = time.perf_counter() - started
        grown_mib = peak_rss_mib() - before_mib
    print(f"Machine: {machine()}")
    print()
    print("| rows | file MB | trace span | wall s | rows/s | peak RSS growth MiB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {recorded.requests:,} | {size_mb:.0f} | {span_s / 86400:.1f} days | {wall_s:.1f} | "
        f"{recorded.requests / wall_s:,.0f} | {grown_mib:.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
