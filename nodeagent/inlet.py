"""Inlet air temperature of the node, for the rack temperature constraints.

Chosen with one command-line spec, parsed once at start-up by :func:`parse_inlet_spec`:

- ``hwmon:LABEL``: the hwmon sensor whose ``temp*_label`` reads LABEL, e.g.
  ``hwmon:Inlet Temp``; its ``temp*_input`` is in millidegrees C. The first match in
  numeric ``hwmonN`` order wins. The sysfs root is injectable.
- ``file:/absolute/path``: a file holding the temperature in degrees C (``23.5``),
  written by whatever knows it (an IPMI/Redfish poller, a sidecar).
- ``none``: no sensor.

A bad spec raises :class:`InletConfigError` (stop at start-up). A sensor that is missing
or unreadable at run time, or reads an implausible value (outside -40..150 degC: a file
of millidegrees, say), reads as None, which telemetry publishes as ``null``; the first
failure is logged as a warning, the recovery as info.
"""

from __future__ import annotations

import abc
import argparse
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_HWMON_ROOT = Path("/sys/class/hwmon")
PLAUSIBLE_RANGE_C = (-40.0, 150.0)
SPEC_FORMS = "'hwmon:<sensor label>', 'file:<absolute path>' or 'none'"


class InletConfigError(ValueError):
    """An inlet temperature spec that cannot work; a configuration error at start-up."""


class InletSource(abc.ABC):
    """Reads the inlet air temperature; ``spec`` is what the operator wrote."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._healthy = True

    @abc.abstractmethod
    def read_c(self) -> float | None:
        """Inlet temperature in degC, or None when unknown (telemetry reports null)."""

    def _checked_c(self, value_c: float) -> float | None:
        low_c, high_c = PLAUSIBLE_RANGE_C
        if not low_c <= value_c <= high_c:
            self._failed(f"implausible inlet temperature {value_c:g} degC")
            return None
        if not self._healthy:
            self._healthy = True
            log.info("inlet temperature readable again", extra={"inlet_spec": self.spec})
        return value_c

    def _failed(self, reason: str) -> None:
        if self._healthy:
            self._healthy = False
            log.warning(
                "inlet temperature unavailable; reporting null",
                extra={"inlet_spec": self.spec, "reason": reason},
            )


class NoInlet(InletSource):
    """No inlet sensor: always None."""

    def __init__(self) -> None:
        super().__init__("none")

    def read_c(self) -> float | None:
        return None


class FileInlet(InletSource):
    """A file holding degrees C as a decimal number."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"file:{path}")
        self.path = path

    def read_c(self) -> float | None:
        try:
            return self._checked_c(float(self.path.read_text().strip()))
        except (OSError, ValueError) as error:
            self._failed(str(error))
            return None


def _numeric_suffix(path: Path) -> int:
    match = re.search(r"(\d+)$", path.name)
    return int(match.group(1)) if match else -1


class HwmonInlet(InletSource):
    """The hwmon temperature sensor labelled ``label`` (``temp*_input`` in millidegrees C)."""

    def __init__(self, label: str, root: Path = DEFAULT_HWMON_ROOT) -> None:
        super().__init__(f"hwmon:{label}")
        self.label = label
        self.root = root
        self._input: Path | None = None

    def find_input(self) -> Path | None:
        """The ``temp*_input`` file of the first sensor labelled ``label``, or None."""
        for chip in sorted(self.root.glob("hwmon*"), key=_numeric_suffix):
            for label_file in sorted(chip.glob("temp*_label"), key=lambda p: p.name):
                try:
                    if label_file.read_text().strip() == self.label:
                        return label_file.with_name(label_file.name.replace("_label", "_input"))
                except OSError:
                    continue
        return None

    def read_c(self) -> float | None:
        if self._input is None:
            self._input = self.find_input()
            if self._input is None:
                self._failed(f"no hwmon sensor labelled {self.label!r} under {self.root}")
                return None
        try:
            return self._checked_c(int(self._input.read_text().strip()) / 1000)
        except (OSError, ValueError) as error:
            self._input = None  # hwmon numbering may have changed: look again next time
            self._failed(str(error))
            return None


def parse_inlet_spec(spec: str, *, hwmon_root: Path = DEFAULT_HWMON_ROOT) -> InletSource:
    """The inlet source a spec names; :class:`InletConfigError` for a bad spec."""
    kind, separator, argument = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "none" and not separator:
        return NoInlet()
    if kind == "hwmon" and separator:
        if not argument.strip():
            raise InletConfigError(f"inlet spec {spec!r}: hwmon needs a sensor label")
        return HwmonInlet(argument.strip(), root=hwmon_root)
    if kind == "file" and separator:
        path = Path(argument.strip())
        if not path.is_absolute():
            raise InletConfigError(f"inlet spec {spec!r}: file needs an absolute path")
        return FileInlet(path)
    raise InletConfigError(f"inlet spec {spec!r}: expected {SPEC_FORMS}")


def inlet_spec_argument(spec: str) -> InletSource:
    """``argparse`` ``type=`` adapter: a bad spec becomes a usage error naming the problem."""
    try:
        return parse_inlet_spec(spec)
    except InletConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
