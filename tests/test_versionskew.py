"""The power-aware kube-scheduler's version against the API server's: the version skew policy
(kube-scheduler as new as the API server or one minor older) decides, and a refusal names
both versions and what to run instead."""

from __future__ import annotations

import json

import pytest

from extender.versioncheck import EXIT_REFUSED, check
from powercap.runtime.logs import configure_logging
from powercap.versionskew import MinorVersion, image_tag, parse_version, skew_refusal

SCHEDULER = "registry.k8s.io/kube-scheduler"


@pytest.mark.parametrize(("text", "expected"), [
    ("v1.31.2", MinorVersion(1, 31)),
    ("1.33", MinorVersion(1, 33)),
    ("v1.30.4-eks-a737599", MinorVersion(1, 30)),
    ("v1.29.10+k3s1", MinorVersion(1, 29)),
    ("latest", None),
    ("", None),
])
def test_versions_are_read_from_tags_and_vendor_builds(text: str, expected: MinorVersion | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(("image", "tag"), [
    (f"{SCHEDULER}:v1.31.2", "v1.31.2"),
    ("registry.example.com:5000/k8s/kube-scheduler:v1.33.0", "v1.33.0"),
    ("registry.example.com:5000/k8s/kube-scheduler", None),
    (f"{SCHEDULER}:v1.32.1@sha256:" + "a" * 64, "v1.32.1"),
    (f"{SCHEDULER}@sha256:" + "a" * 64, None),
])
def test_the_tag_is_found_past_registry_ports_and_digests(image: str, tag: str | None) -> None:
    assert image_tag(image) == tag


@pytest.mark.parametrize(("server", "scheduler"), [((1, 33), (1, 33)), ((1, 33), (1, 32))])
def test_the_same_minor_or_one_older_is_supported(server: tuple[int, int], scheduler: tuple[int, int]) -> None:
    assert skew_refusal(MinorVersion(*server), MinorVersion(*scheduler), "img") is None


@pytest.mark.parametrize(("server", "scheduler", "relation"), [
    ((1, 31), (1, 33), "is newer than the API server 1.31"),
    ((1, 33), (1, 31), "is 2 minor versions older than the API server 1.33"),
    ((1, 37), (1, 31), "is 6 minor versions older than the API server 1.37"),
])
def test_a_newer_or_much_older_scheduler_is_refused_naming_what_to_run(
    server: tuple[int, int], scheduler: tuple[int, int], relation: str,
) -> None:
    refusal = skew_refusal(MinorVersion(*server), MinorVersion(*scheduler), f"{SCHEDULER}:v{scheduler[0]}.{scheduler[1]}.0")
    assert refusal is not None
    assert relation in refusal
    assert f"(image {SCHEDULER}:v{scheduler[0]}.{scheduler[1]}.0)" in refusal
    assert f"allows kube-scheduler {server[0]}.{server[1]} or {server[0]}.{server[1] - 1}" in refusal


def log_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_check_exits_1_with_one_error_line_carrying_both_versions(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    assert check(f"{SCHEDULER}:v1.31.2", "v1.33.1") == EXIT_REFUSED
    [line] = log_lines(capsys.readouterr().err)
    assert line["level"] == "error"
    assert line["image"] == f"{SCHEDULER}:v1.31.2" and line["api_server_version"] == "v1.33.1"
    assert "2 minor versions older" in str(line["message"])


def test_an_untagged_image_is_let_through_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    assert check(f"{SCHEDULER}@sha256:" + "b" * 64, "v1.33.1") == 0
    [line] = log_lines(capsys.readouterr().err)
    assert line["level"] == "warning" and "not checked" in str(line["message"])
