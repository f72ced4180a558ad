"""`powercap validate`: exit codes, output a person reads, and no traceback for any input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from powercap.commands import main

from .conftest import REPO_ROOT, SAMPLES_DIR

BAD_POLICY = """\
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata:
  name: broken
  namespace: inference
spec:
  powerCapLimit: 0
  rackConstraints:
    - rackId: rack-1
      maxPower: 5000
    - rackId: rack-2
      maxPower: 0
      maxTemperature: 90
"""
WARN_POLICY = """\
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata: {name: tiny}
spec: {powerCapLimit: 150}
"""


def run_cli(capsys: pytest.CaptureFixture[str], *args: str, stdin: str = "") -> tuple[int, str, str]:
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(["validate", *args])
    finally:
        sys.stdin = old_stdin
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_samples_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in SAMPLES_DIR.glob("*.yaml"))
    code, out, _ = run_cli(capsys, *files)
    assert code == 0
    assert out.splitlines()[-1] == f"{len(files)} documents: {len(files)} valid, 0 invalid"


def test_bad_file_names_every_bad_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BAD_POLICY)
    code, out, _ = run_cli(capsys, str(path))
    assert code == 1
    assert out.splitlines() == [
        f"{path}: inference/broken: spec.powerCapLimit: must be greater than 0",
        f"{path}: inference/broken: spec.rackConstraints[1].maxPower: must be greater than 0",
        f"{path}: inference/broken: spec.rackConstraints[1].maxTemperature: must be at most 60",
        "1 document: 0 valid, 1 invalid",
    ]


def test_warnings_follow_errors_and_do_not_fail(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(WARN_POLICY)
    code, out, _ = run_cli(capsys, str(path))
    assert code == 0
    assert out.splitlines()[0].startswith(f"{path}: default/tiny: warning: spec.powerCapLimit: 150 W is below")
    assert out.splitlines()[1] == f"{path}: default/tiny: valid"


def test_multi_document_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    text = (SAMPLES_DIR / "basic.yaml").read_text() + "---\n" + BAD_POLICY
    code, out, _ = run_cli(capsys, "-", stdin=text)
    assert code == 1
    assert "<stdin>: default/llm-inference-power-capping: valid" in out
    assert "<stdin>: inference/broken: spec.powerCapLimit: must be greater than 0" in out


def test_json_input_and_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({
        "apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy",
        "metadata": {"name": "j"}, "spec": {"powerCapLimit": -1},
    }))
    code, out, _ = run_cli(capsys, "--output", "json", str(path))
    assert code == 1
    report = json.loads(out)
    assert report["valid"] is False
    assert report["documents"][0]["errors"] == [{"path": "spec.powerCapLimit", "message": "must be greater than 0"}]


def test_kubectl_list_output_is_expanded(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "- " + line + "\n" if i == 0 else "  " + line + "\n"
        for i, line in enumerate((SAMPLES_DIR / "basic.yaml").read_text().splitlines())
    ))
    code, out, _ = run_cli(capsys, str(path))
    assert code == 0
    assert "default/llm-inference-power-capping: valid" in out


@pytest.mark.parametrize(
    ("content", "expected_code", "expected"),
    [
        # README: "2 a file could not be read or parsed"; an empty file holds no policy to check
        pytest.param(b"", 2, "input.yaml: error: no documents found (the file is empty or only comments)", id="empty-file"),
        pytest.param(b"# nothing yet\n---\n", 2, "input.yaml: error: no documents found", id="only-comments"),
        pytest.param(b"spec: [unclosed\n", 2, "error: document 1: invalid YAML at line 2", id="yaml-syntax-error"),
        pytest.param(b"- a\n- b\n", 1, "document 1: a policy must be an object, not a list", id="a-list"),
        pytest.param(b"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n", 1,
                     "default/p: kind: must be PowerCappingPolicy, not 'Pod'", id="a-pod"),
        pytest.param(bytes(range(256)), 2, "error: not UTF-8 text", id="binary-junk"),
        pytest.param(b"\x00\x01\x02abc", 2, "error: binary data, not YAML or JSON text", id="nul-bytes"),
        pytest.param(b"{\"spec\": ", 2, "error: document 1: invalid YAML", id="truncated-json"),
        pytest.param(b"[" * 5000, 2, "error:", id="deep-nesting"),
        pytest.param(b"42\n", 1, "a policy must be an object, not an integer", id="a-scalar"),
        pytest.param(b"kind: PowerCappingPolicy\nspec: {powerCapLimit: 100}\nspec: {powerCapLimit: 200}\n", 2,
                     'error: document 1: invalid YAML at line 3, column 1: duplicate key "spec" (first at line 2)', id="duplicate-key"),
    ],
)
def test_any_input_gets_a_message_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, expected_code: int, expected: str
) -> None:
    path = tmp_path / "input.yaml"
    path.write_bytes(content)
    code, out, err = run_cli(capsys, str(path))
    assert code == expected_code
    assert expected in out
    assert "Traceback" not in out + err


def test_a_yaml_error_names_the_document_of_the_stream_it_is_in(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """In a file of several policies, the line alone does not say which policy is broken."""
    path = tmp_path / "policies.yaml"
    path.write_text((SAMPLES_DIR / "basic.yaml").read_text() + "---\n" + WARN_POLICY + "---\nspec: [unclosed\n")
    code, out, _ = run_cli(capsys, str(path))
    assert code == 2
    assert f"{path}: error: document 3: invalid YAML at line" in out


def test_a_cluster_with_no_policies_is_not_an_unreadable_file(capsys: pytest.CaptureFixture[str]) -> None:
    """`kubectl get pcp -A -o yaml | powercap validate -` with none: an empty List, nothing invalid."""
    code, out, _ = run_cli(capsys, "-", stdin="apiVersion: v1\nitems: []\nkind: List\nmetadata:\n  resourceVersion: \"\"\n")
    assert code == 0
    assert out == "0 documents: 0 valid, 0 invalid\n"


def test_an_empty_file_beside_valid_ones_still_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    code, out, _ = run_cli(capsys, str(SAMPLES_DIR / "basic.yaml"), str(tmp_path / "empty.yaml"))
    assert code == 2
    assert "default/llm-inference-power-capping: valid" in out
    assert out.splitlines()[-1] == "1 document: 1 valid, 0 invalid; 1 file unreadable"


def every_option() -> list[tuple[str, str]]:
    import argparse

    from powercap.commands import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(command, action.option_strings[-1]) for command, parser in subparsers.choices.items()
            for action in parser._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize(("command", "option"), every_option())
def test_options_have_help(capsys: pytest.CaptureFixture[str], command: str, option: str) -> None:
    """`powercap COMMAND --help` explains every option, not just its name."""
    import argparse

    from powercap.commands import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in subparsers.choices[command]._actions if option in a.option_strings)
    assert action.help and action.help.strip(), f"powercap {command} {option} has no help text"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert " ".join(action.help.split()[:3]) in " ".join(capsys.readouterr().out.split())


def test_the_readmes_agent_example_leaves_no_file_for_git_to_list(tmp_path: Path) -> None:
    """The README's agent example writes its state file where git ignores it."""
    import re
    import shutil

    readme = (REPO_ROOT / "README.md").read_text()
    state_files = re.findall(r"powercap agent .*--state-file (\S+)", readme)
    assert state_files, "the README's agent example has no --state-file"
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    for state_file in state_files:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", state_file], cwd=REPO_ROOT, timeout=30)
        assert ignored.returncode == 0, f"{state_file} (README's agent example) would show in git status"
    # and the same name anywhere in the checkout (docs/nodeagent.md's example writes ./agent-state.json)
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", "agent-state.json"], cwd=REPO_ROOT, timeout=30).returncode == 0


def test_missing_file_and_directory_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, str(tmp_path / "nope.yaml"), str(tmp_path), str(SAMPLES_DIR / "basic.yaml"))
    assert code == 2
    assert f"{tmp_path / 'nope.yaml'}: error: no such file" in out
    assert f"{tmp_path}: error: is a directory" in out
    assert "default/llm-inference-power-capping: valid" in out, "other files are still validated"


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: FILE" in capsys.readouterr().err


def test_installed_console_script(tmp_path: Path) -> None:
    """The `powercap` command a user runs, from the installed entry point."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    script = Path(sys.executable).parent / "powercap"
    completed = subprocess.run(
        [str(script), "validate", str(SAMPLES_DIR / "full.yaml"), str(bad)],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONWARNINGS": "error"}, timeout=60,
    )
    assert completed.returncode == 1
    assert "inference/llama-70b-chat: valid" in completed.stdout
    assert "inference/broken: spec.powerCapLimit: must be greater than 0" in completed.stdout
    assert completed.stderr == ""


def test_standard_input_closed_is_a_message_not_a_traceback() -> None:
    script = Path(sys.executable).parent / "powercap"
    completed = subprocess.run([str(script), "validate", "-"], capture_output=True, text=True, timeout=60,
                               preexec_fn=lambda: os.close(0))  # the shell's `<&-`
    assert completed.returncode == 2
    assert "<stdin>: error: standard input is closed" in completed.stdout
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["webhook", "--cert-dir", "/tmp", "--bind", "127.0.0.1:99999"], "argument --bind: '127.0.0.1:99999' is not HOST:PORT", id="webhook-port"),
        pytest.param(["webhook", "--cert-dir", "/tmp", "--bind", "nonsense"], "argument --bind: 'nonsense' is not HOST:PORT", id="webhook-host"),
        pytest.param(["webhook", "--cert-dir", "/tmp", "--workers", "x"], "argument --workers: 'x' is not an integer", id="webhook-workers"),
        pytest.param(["certs", "--service", "s", "--namespace", "n", "--out", "/tmp/x", "--days", "99999999"],
                     "argument --days: must be at most 36500 days, not 99999999", id="certs-days"),
        pytest.param(["extender", "--threads", "0"], "argument --threads: must be at least 1, not 0", id="extender-threads"),
        pytest.param(["certs", "--service", "Bad Name!", "--namespace", "n", "--out", "/tmp/x"],
                     "argument --service: 'Bad Name!' is not a Kubernetes name", id="certs-service"),
        pytest.param(["certs", "--service", "s", "--namespace", "n", "--out", "/tmp/x", "--extra-san", ""],
                     "argument --extra-san: '' is neither an IP address nor a DNS name", id="certs-san"),
        pytest.param(["agent", "--node", ""], "argument --node: '' is not a Node name", id="agent-node"),
    ],
)
def test_out_of_range_flags_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    """``powercap validate ... | head -1``: no BrokenPipeError traceback, SIGPIPE's exit status."""
    script = Path(sys.executable).parent / "powercap"
    files = [str(SAMPLES_DIR / "basic.yaml")] * 3000  # far more output than a pipe buffers
    process = subprocess.Popen([str(script), "validate", *files], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(10)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert stderr == ""
