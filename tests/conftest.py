"""Shared fixtures for the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from powercap.algorithms import AlgorithmRegistry
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.nvml import (  # noqa: F401 - fixtures, re-exported for every test module
    fake_nvml,
    fake_nvml_build,
    fake_nvml_lib,
    fake_nvml_subprocess,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "config" / "samples"


@pytest.fixture(scope="session")
def registry() -> AlgorithmRegistry:
    return AlgorithmRegistry.default()


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    """A running fake Kubernetes API server (tests/fakes/apiserver.py), stopped after
    the test. Point a client at ``apiserver.url``."""
    with FakeApiServer() as server:
        yield server
