"""Least privilege: the RBAC of the built bundle is exactly docs/rbac.md, and every rule is
used by the code the table names.

An operator reviewing the install reads docs/rbac.md; these tests keep that review true.
A permission added to a manifest without a row fails, a row whose rule went away fails, and
a row whose code no longer makes that kind of request fails.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from tests.conftest import REPO_ROOT
from tests.manifests import NAMESPACE, Manifest, kustomize_build

DOC = REPO_ROOT / "docs" / "rbac.md"
RuleKey = tuple[str, str, str, str, str, str]  # account, role, scope, group, resource, names
# What a call in the code implies it needs: a watch cache lists and watches, update_status
# reads before it replaces, a leader elector gets, creates and updates its Lease.
VERBS_OF_CALL = {
    "WatchCache(": {"list", "watch"},
    ".get(": {"get"},
    "patch_node_annotations(": {"patch"},
    "publish_node_status(": {"create", "patch"},
    ".patch(": {"patch"},
    "post_event(": {"create"},
    "evict_pod(": {"create"},
    "update_status(": {"get", "update"},
    ".replace(": {"update"},
    "LeaderElector(": {"get", "create", "update"},
}


def markdown_table(heading: str) -> list[list[str]]:
    """The body rows of the first table under ``## heading`` in docs/rbac.md."""
    section = DOC.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def split_list(cell: str) -> list[str]:
    return [item.strip() for item in cell.split(",")]


@pytest.fixture(scope="module")
def bundle() -> list[Manifest]:
    return kustomize_build("config/default")


@pytest.fixture(scope="module")
def granted(bundle: list[Manifest]) -> tuple[dict[RuleKey, set[str]], set[tuple[str, str, str]]]:
    """(rules of the bundle's own roles by who gets them, bindings to roles it does not define)."""
    roles = {
        (m["kind"], m["metadata"]["name"], m["metadata"].get("namespace")): m
        for m in bundle if m["kind"] in ("Role", "ClusterRole")
    }
    rules: dict[RuleKey, set[str]] = defaultdict(set)
    builtin = set()
    bound = set()
    for binding in (m for m in bundle if m["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")
        key = (ref["kind"], ref["name"], namespace if ref["kind"] == "Role" else None)
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else namespace
        for subject in binding["subjects"]:
            assert (subject["kind"], subject["namespace"]) == ("ServiceAccount", NAMESPACE), binding["metadata"]["name"]
            account = subject["name"]
            if key not in roles:
                where = f" ({namespace})" if namespace != NAMESPACE and namespace else ""
                builtin.add((account, f"{binding['kind']} {binding['metadata']['name']}{where}", f"{ref['kind']} {ref['name']}"))
                continue
            bound.add(key)
            for rule in roles[key]["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        names = ", ".join(rule.get("resourceNames", [])) or "all"
                        role = f"{ref['kind']} {ref['name']}"
                        rules[account, role, scope, group or "core", resource, names] |= set(rule["verbs"])
    assert set(roles) == bound, f"roles nobody is bound to: {set(roles) - bound}"
    return dict(rules), builtin


def test_rules_are_exactly_the_table(granted: tuple[dict[RuleKey, set[str]], set[tuple[str, str, str]]]) -> None:
    documented: dict[RuleKey, set[str]] = {}
    for row in markdown_table("Rules"):
        account, role, scope, group, resource, names, verbs, why, _ = row
        assert why, f"no reason given for {row[:7]}"
        key = (account, role, scope, group, resource, names)
        assert key not in documented, f"documented twice: {key}"
        documented[key] = set(split_list(verbs))
    rules, _ = granted
    assert {k: sorted(v) for k, v in rules.items()} == {k: sorted(v) for k, v in documented.items()}


def test_bindings_to_kubernetes_roles_are_exactly_the_table(
    granted: tuple[dict[RuleKey, set[str]], set[tuple[str, str, str]]],
) -> None:
    documented = set()
    for account, binding, role, why in markdown_table("Bindings to Kubernetes' own roles"):
        assert why
        documented.add((account, binding, role))
    assert granted[1] == documented


def test_every_rule_is_used_by_the_code_it_names() -> None:
    for row in markdown_table("Rules"):
        verbs, code = set(split_list(row[6])), row[8]
        quoted = re.findall(r"`([^`]+)`", code)
        assert quoted, f"no code named for {row[:7]}"
        # the cell is `path` `snippet` [`snippet` ...] [`path` `snippet` ...]
        calls: set[str] = set()
        path = None
        for item in quoted:
            if (REPO_ROOT / item).is_file():
                path = REPO_ROOT / item
                continue
            assert path is not None, f"{item!r}: no file named before it"
            assert item in path.read_text(), f"{path.relative_to(REPO_ROOT)} no longer contains {item!r}"
            if path.suffix == ".py":
                calls |= {verb for call, implied in VERBS_OF_CALL.items() if call in item for verb in implied}
        if path is not None and path.suffix == ".py":
            assert verbs <= calls, f"{row[:7]}: the code named makes no {sorted(verbs - calls)} request"


def test_nothing_is_granted_by_wildcard_or_on_secrets(bundle: list[Manifest]) -> None:
    for role in (m for m in bundle if m["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
            assert "secrets" not in rule["resources"], role["metadata"]["name"]
