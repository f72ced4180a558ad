"""Shared fixtures. tests/ is on sys.path (pytest's rootdir-less import mode)."""

from fakes.nvml import (  # noqa: F401 - fixtures, re-exported for every test module
    fake_nvml,
    fake_nvml_build,
    fake_nvml_lib,
    fake_nvml_subprocess,
)
