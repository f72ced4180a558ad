from __future__ import annotations

from pathlib import Path

import pytest

from powercap.algorithms import AlgorithmRegistry

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "config" / "samples"


@pytest.fixture(scope="session")
def registry() -> AlgorithmRegistry:
    return AlgorithmRegistry.default()
