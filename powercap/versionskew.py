"""Kubernetes' version skew policy for the power-aware kube-scheduler.

https://kubernetes.io/releases/version-skew-policy/: kube-scheduler must not be newer than
the kube-apiserver it talks to, and may be at most one minor version older (so that a
control-plane upgrade can run). The power-aware scheduler is an operator-installed
kube-scheduler, so nothing upgrades it with the cluster; this check refuses to start one the
policy does not support, saying which image to run instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEDULER_MAY_LAG_MINORS = 1
_VERSION = re.compile(r"^v?(?P<major>\d+)\.(?P<minor>\d+)(?:\.(?P<patch>\d+))?")


@dataclass(frozen=True, order=True)
class MinorVersion:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


def parse_version(text: str) -> MinorVersion | None:
    """The minor version of ``v1.31.2``, ``1.31``, ``v1.30.4-eks-a737599``, ...; None when
    ``text`` does not start with one (``latest``, a digest)."""
    match = _VERSION.match(text.strip())
    return MinorVersion(int(match["major"]), int(match["minor"])) if match else None


def image_tag(image: str) -> str | None:
    """The tag of ``registry:port/path/name:tag[@digest]``; None for an untagged image."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


def skew_refusal(api_server: MinorVersion, scheduler: MinorVersion, scheduler_image: str) -> str | None:
    """Why this scheduler must not run against this API server, or None when the policy
    supports the pair."""
    if scheduler.major != api_server.major or scheduler > api_server:
        relation = "newer than"
    elif api_server.minor - scheduler.minor > SCHEDULER_MAY_LAG_MINORS:
        relation = f"{api_server.minor - scheduler.minor} minor versions older than"
    else:
        return None
    return (
        f"kube-scheduler {scheduler} (image {scheduler_image}) is {relation} the API server {api_server}; "
        f"the version skew policy allows kube-scheduler {api_server} or {api_server.major}.{api_server.minor - 1}: "
        f"run the image of the cluster's version (docs/operations.md#the-scheduler-image)"
    )
