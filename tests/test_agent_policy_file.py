"""``--policy FILE`` edited while the agent runs: each new problem said once, in one line,
the last good policy kept, and the problem shown on /status until the file is fixed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from nodeagent.sources import FilePolicySource, PolicyFileError
from tests.agenthelpers import policy_document

UUIDS = ["GPU-0", "GPU-1"]


def write(path: Path, cap_w: float) -> None:
    path.write_text(yaml.safe_dump(policy_document(cap_w=cap_w)))


def test_each_new_problem_is_logged_once_and_the_last_good_policy_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "policy.yaml"
    write(path, 800)
    source = FilePolicySource(path, "node-1", UUIDS)
    edits: list[tuple[bytes | None, str]] = [
        (b"a: [b\n", f"{path}: invalid YAML at line 2, column 1: "),
        (b"spec: {}\nspec: {}\n", f'{path}: invalid YAML at line 2, column 1: duplicate key "spec" (first at line 1)'),
        (b"hello\n", f"{path}: a policy must be an object, not a string"),
        (b"\xff\xfe\x00", f"{path}: not UTF-8 text"),
        (yaml.safe_dump(policy_document(cap_w=-5)).encode(), "spec.powerCapLimit: must be greater than 0"),
        (None, f"{path}: no such file"),
    ]
    caplog.set_level(logging.ERROR, logger="nodeagent.sources")
    for content, problem in edits:
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
        for _ in range(2):  # looked at every tick: said once
            view = source.view()
            assert not view.fresh and view.problem is not None and problem in view.problem
            assert [p.power_cap_w for p in view.policies] == [800]
        assert sum(problem in str(getattr(r, "error", "")) for r in caplog.records) == 1, problem
        assert all("\n" not in str(getattr(r, "error", "")) for r in caplog.records)
    write(path, 600)
    view = source.view()
    assert view.fresh and view.problem is None and [p.power_cap_w for p in view.policies] == [600]


def test_a_bad_file_at_start_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"spec: {powerCapLimit: [\n")
    with pytest.raises(PolicyFileError) as raised:
        FilePolicySource(path, "node-1", UUIDS)
    assert str(raised.value).startswith(f"{path}: invalid YAML at line 2, column 1: ")
    assert "\n" not in str(raised.value)
