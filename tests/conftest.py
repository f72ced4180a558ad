"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes.apiserver import FakeApiServer


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    """A running fake Kubernetes API server (tests/fakes/apiserver.py), stopped after
    the test. Point a client at ``apiserver.url``."""
    with FakeApiServer() as server:
        yield server
