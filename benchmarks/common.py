"""Helpers every benchmark script shares: the machine line, percentiles, docs/benchmarks.md sections.

Scripts run as ``.venv/bin/python benchmarks/<name>.py``, so this module is imported as
``common`` (the script's folder is first on sys.path).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """``2 CPUs (nproc), AMD EPYC ..., Linux 6.x, Python 3.11.7; load average 1.2 / 0.8 / 0.5``."""
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {load}"
    )


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile (0 <= q <= 1) of ``samples``."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the ``## {heading}`` section of ``path`` with ``section`` (append it when
    missing; create the file when absent). Other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
