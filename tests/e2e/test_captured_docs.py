"""The kubectl outputs in README.md and docs/ are what a real cluster prints: every
captured block (tests/e2e/captures.py) is produced again on scripts/local-cluster.sh's
cluster and compared, volatile values masked. A failure means the docs drifted: run
scripts/capture-docs.sh and review the diff."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import localcluster
from tests.e2e.captures import BY_NAME, CAPTURES, capture_all, doc_blocks, normalized
from tests.e2e.harness import REPO_ROOT, running_controlplane


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    directory = tmp_path_factory.mktemp("capture") / "cluster"
    assert localcluster.up(directory, localcluster.DEFAULT_SCENARIO) == 0
    try:
        yield capture_all(running_controlplane(directory))
    finally:
        localcluster.down(directory)


def test_every_block_names_a_capture_and_every_capture_is_shown() -> None:
    named = [name for _, name, _ in doc_blocks()]
    assert sorted(set(named) - set(BY_NAME)) == []
    assert sorted(set(BY_NAME) - set(named)) == []


@pytest.mark.parametrize(("path", "name", "shown"), list(doc_blocks()),
                         ids=[f"{p.relative_to(REPO_ROOT)}:{n}" for p, n, _ in doc_blocks()])
def test_the_docs_show_what_the_cluster_prints(outputs: dict[str, str], path: Path, name: str, shown: str) -> None:
    capture = BY_NAME[name]
    assert normalized(capture, shown) == normalized(capture, outputs[name]), (
        f"{path.relative_to(REPO_ROOT)}: the block {name} differs from what the cluster prints now; "
        f"run scripts/capture-docs.sh.\nprinted:\n{outputs[name]}")


def test_the_captures_show_refusals_not_successes(outputs: dict[str, str]) -> None:
    """A capture that silently succeeded would make the docs show the wrong thing."""
    assert "is invalid" in outputs["refused-by-webhook"] and "created" not in outputs["refused-by-webhook"]
    assert "may select the same pods" in outputs["refused-overlap"]
    assert outputs["refused-client-go"].startswith('admission webhook "validate.powercapping.example.com" denied the request: ')
    assert "nested more than 64 levels deep" in outputs["refused-too-deep"]
    assert "maxPower 1000 W (set by policy llama/llama)" in outputs["refused-by-rack"]
    assert "has no budget free for this pod yet" in outputs["refused-for-budget"]
    assert len(CAPTURES) == len(BY_NAME)
