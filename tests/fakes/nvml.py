"""Build, load and drive the fake ``libnvidia-ml.so.1`` (tests/fakes/fake_nvml.c).

pynvml's own code runs against it: it ``dlopen``s ``libnvidia-ml.so.1`` and makes real
ctypes calls with NVML's struct layouts.

- In-process: :func:`load_in_process` loads the built library with ``RTLD_GLOBAL`` from
  a path the dynamic loader would never search. pynvml's later
  ``CDLL("libnvidia-ml.so.1")`` is resolved by glibc to that already-loaded object
  through its soname (``-Wl,-soname,libnvidia-ml.so.1``); tests check it is the same
  handle. :meth:`FakeNvml.in_process` drives it through the exported control functions.
- Subprocesses: :meth:`FakeNvml.for_subprocess` gives an environment with the library's
  directory (holding a ``libnvidia-ml.so.1`` link) on ``LD_LIBRARY_PATH`` and a control
  file in ``FAKE_NVML_CONTROL``, to which every command is appended; the library applies
  new lines when the file's mtime or size changes. Set calls are logged to
  ``FAKE_NVML_SET_LOG``; the limits in force are written to ``FAKE_NVML_STATE`` whenever
  they may have changed (:meth:`FakeNvml.limits_in_force`), so a test samples what the
  child enforces while it runs.

Fixtures (re-exported by tests/conftest.py): ``fake_nvml_build`` (session: compile once),
``fake_nvml`` (in-process, state reset for each test), ``fake_nvml_subprocess``.
"""

from __future__ import annotations

import ctypes
import enum
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("fake_nvml.c")
SONAME = "libnvidia-ml.so.1"


class NvmlReturn(enum.IntEnum):
    """nvmlReturn_t codes (nvml.h) used by the tests."""

    SUCCESS = 0
    UNINITIALIZED = 1
    INVALID_ARGUMENT = 2
    NOT_SUPPORTED = 3
    NO_PERMISSION = 4
    INSUFFICIENT_SIZE = 7
    DRIVER_NOT_LOADED = 9
    FUNCTION_NOT_FOUND = 13
    GPU_IS_LOST = 15
    RESET_REQUIRED = 16
    UNKNOWN = 999


@dataclass(frozen=True)
class FakeNvmlBuild:
    """The compiled library: ``path`` for in-process loading, ``library_dir`` for
    ``LD_LIBRARY_PATH`` (it holds a ``libnvidia-ml.so.1`` link to ``path``)."""

    path: Path
    library_dir: Path


@dataclass(frozen=True)
class GpuLimits:
    """One GPU's limits as the fake held them at its last change, in W."""

    index: int
    limit_w: float
    enforced_w: float
    min_w: float
    max_w: float
    default_w: float


@dataclass(frozen=True)
class SetCall:
    """One logged ``nvmlDeviceSetPowerManagementLimit`` call."""

    gpu: int
    limit_mw: int
    rc: int


def build_fake_nvml(out_dir: Path) -> FakeNvmlBuild:
    """Compile fake_nvml.c under ``out_dir`` (gcc is a test requirement: see README)."""
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) found: the NVML tests build a fake libnvidia-ml.so")
    path = out_dir / "build" / "fake-libnvidia-ml.so"
    library_dir = out_dir / "lib"
    path.parent.mkdir(parents=True)
    library_dir.mkdir()
    command = [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra"]
    command += [f"-Wl,-soname,{SONAME}", "-o", str(path), str(SOURCE)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    (library_dir / SONAME).symlink_to(path)
    return FakeNvmlBuild(path=path, library_dir=library_dir)


def load_in_process(build: FakeNvmlBuild) -> ctypes.CDLL:
    """Load the fake globally so that pynvml's ``dlopen`` resolves to it by soname."""
    lib = ctypes.CDLL(str(build.path), mode=ctypes.RTLD_GLOBAL)
    lib.fake_nvml_command.argtypes = [ctypes.c_char_p]
    lib.fake_nvml_command.restype = ctypes.c_int
    lib.fake_nvml_set_calls.restype = ctypes.c_ulong
    lib.fake_nvml_calls.argtypes = [ctypes.c_char_p]
    lib.fake_nvml_calls.restype = ctypes.c_ulong
    for name in ("fake_nvml_limit_mw", "fake_nvml_enforced_mw"):
        getattr(lib, name).argtypes = [ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_uint
    lib.fake_nvml_init_refcount.restype = ctypes.c_int
    return lib


def mw(watts: float) -> int:
    return round(watts * 1000)


class FakeNvml:
    """Drives the fake library. Setters take W / degC / J and send the library's commands."""

    def __init__(
        self,
        send: Callable[[str], None],
        *,
        lib: ctypes.CDLL | None = None,
        env: dict[str, str] | None = None,
        set_log: Path | None = None,
        state_file: Path | None = None,
    ) -> None:
        self._send = send
        self._lib = lib
        self._env = env or {}
        self._set_log = set_log
        self._state_file = state_file

    @classmethod
    def in_process(cls, lib: ctypes.CDLL) -> FakeNvml:
        def send(line: str) -> None:
            if lib.fake_nvml_command(line.encode()) != 0:
                raise ValueError(f"fake NVML rejected command {line!r}")

        return cls(send, lib=lib)

    @classmethod
    def for_subprocess(cls, build: FakeNvmlBuild, work_dir: Path) -> FakeNvml:
        control = work_dir / "fake-nvml-control.txt"
        set_log = work_dir / "fake-nvml-set.log"
        state_file = work_dir / "fake-nvml-state.txt"
        control.write_text("reset\n")
        set_log.write_text("")
        state_file.unlink(missing_ok=True)

        def send(line: str) -> None:
            with control.open("a") as stream:
                stream.write(line + "\n")

        env = {
            "LD_LIBRARY_PATH": str(build.library_dir),
            "FAKE_NVML_CONTROL": str(control),
            "FAKE_NVML_SET_LOG": str(set_log),
            "FAKE_NVML_STATE": str(state_file),
        }
        return cls(send, env=env, set_log=set_log, state_file=state_file)

    # -- configuration -------------------------------------------------------------
    def command(self, line: str) -> FakeNvml:
        """Send one raw command (see fake_nvml.c)."""
        self._send(line)
        return self

    def reset(self) -> FakeNvml:
        """One default GPU (H200-like, 200-700 W), no errors, counters at zero."""
        return self.command("reset")

    def set_count(self, count: int) -> FakeNvml:
        return self.command(f"count {count}")

    def set_identity(
        self, index: int, *, uuid: str | None = None, name: str | None = None
    ) -> FakeNvml:
        if uuid is not None:
            self.command(f"uuid {index} {uuid}")
        if name is not None:
            self.command(f"name {index} {name}")
        return self

    def set_power_w(self, index: int, watts: float) -> FakeNvml:
        return self.command(f"power_mw {index} {mw(watts)}")

    def set_limits_w(
        self, index: int, *, min_w: float, max_w: float, default_w: float
    ) -> FakeNvml:
        """Limit constraints and default limit; the current limit is set to the default."""
        self.command(f"limits_mw {index} {mw(min_w)} {mw(max_w)} {mw(default_w)}")
        return self.set_limit_w(index, default_w)

    def set_limit_w(self, index: int, watts: float) -> FakeNvml:
        """The management limit, as if someone had set it before."""
        return self.command(f"limit_mw {index} {mw(watts)}")

    def set_limiter_w(self, index: int, watts: float | None) -> FakeNvml:
        """An out-of-band limiter holding the enforced limit at most ``watts``; None removes it."""
        return self.command(f"limiter_mw {index} {mw(watts or 0)}")

    def set_temperature_c(self, index: int, temp_c: int) -> FakeNvml:
        return self.command(f"temp_c {index} {temp_c}")

    def set_thresholds_c(self, index: int, *, slowdown_c: int, shutdown_c: int) -> FakeNvml:
        self.command(f"slowdown_c {index} {slowdown_c}")
        return self.command(f"shutdown_c {index} {shutdown_c}")

    def set_energy_j(self, index: int, joules: float) -> FakeNvml:
        return self.command(f"energy_mj {index} {mw(joules)}")

    def set_pids(self, index: int, pids: Iterable[int]) -> FakeNvml:
        return self.command(" ".join(["pids", str(index), *map(str, pids)]))

    def inject_error(
        self, function: str, code: int, *, gpu: int | None = None, times: int | None = None
    ) -> FakeNvml:
        """Make NVML ``function`` return ``code`` for ``gpu`` (None: every GPU and library-wide
        calls), ``times`` times (None: until :meth:`clear_errors`)."""
        target = "*" if gpu is None else str(gpu)
        suffix = "" if times is None else f" {times}"
        return self.command(f"error {function} {target} {int(code)}{suffix}")

    def clear_errors(self) -> FakeNvml:
        return self.command("clear_errors")

    # -- observation ---------------------------------------------------------------
    def _library(self) -> ctypes.CDLL:
        if self._lib is None:
            raise RuntimeError("counters live in the subprocess; use logged_set_calls()")
        return self._lib

    def set_calls(self) -> int:
        """nvmlDeviceSetPowerManagementLimit calls since the last reset (in-process)."""
        return int(self._library().fake_nvml_set_calls())

    def calls(self, function: str) -> int:
        """Calls of one NVML function since the last reset (in-process)."""
        return int(self._library().fake_nvml_calls(function.encode()))

    def limit_w(self, index: int) -> float:
        return self._library().fake_nvml_limit_mw(index) / 1000

    def enforced_limit_w(self, index: int) -> float:
        return self._library().fake_nvml_enforced_mw(index) / 1000

    def init_refcount(self) -> int:
        """nvmlInit calls not matched by nvmlShutdown."""
        return int(self._library().fake_nvml_init_refcount())

    def env(self) -> dict[str, str]:
        """Environment entries that point a subprocess at the fake (subprocess mode)."""
        return dict(self._env)

    def limits_in_force(self) -> list[GpuLimits] | None:
        """Every GPU's limits as the child process's fake last wrote them (subprocess
        mode); None before a child has started NVML."""
        if self._state_file is None:
            raise RuntimeError("no state file in in-process mode; use limit_w()")
        try:
            lines = self._state_file.read_text().splitlines()
        except FileNotFoundError:
            return None
        limits = []
        for line in lines[1:]:
            words = line.split()
            fields = dict(zip(words[2::2], (int(w) for w in words[3::2])))
            limits.append(GpuLimits(int(words[1]), fields["limit_mw"] / 1000, fields["enforced_mw"] / 1000,
                                    fields["min_mw"] / 1000, fields["max_mw"] / 1000, fields["default_mw"] / 1000))
        return limits

    def logged_set_calls(self) -> list[SetCall]:
        """Set calls recorded in ``FAKE_NVML_SET_LOG`` (subprocess mode)."""
        if self._set_log is None:
            raise RuntimeError("no set log in in-process mode; use set_calls()")
        calls = []
        for line in self._set_log.read_text().splitlines():
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            calls.append(SetCall(int(fields["gpu"]), int(fields["limit_mw"]), int(fields["rc"])))
        return calls


@pytest.fixture(scope="session")
def fake_nvml_build(tmp_path_factory: pytest.TempPathFactory) -> FakeNvmlBuild:
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture(scope="session")
def fake_nvml_lib(fake_nvml_build: FakeNvmlBuild) -> ctypes.CDLL:
    return load_in_process(fake_nvml_build)


@pytest.fixture
def fake_nvml(fake_nvml_lib: ctypes.CDLL) -> Iterator[FakeNvml]:
    """The in-process fake, reset to one default GPU for each test."""
    fake = FakeNvml.in_process(fake_nvml_lib).reset()
    yield fake
    fake.reset()


@pytest.fixture
def fake_nvml_subprocess(fake_nvml_build: FakeNvmlBuild, tmp_path: Path) -> FakeNvml:
    """A fake for child processes: pass ``env=`` with :meth:`FakeNvml.env` entries."""
    return FakeNvml.for_subprocess(fake_nvml_build, tmp_path)
