"""RFC 6902 JSON Patch from two JSON documents: how the mutating webhook reports defaults.

``diff(before, after)`` gives operations that turn ``before`` into ``after``:

- objects: ``remove`` keys only in ``before``, ``add`` keys only in ``after`` (in
  ``after``'s order), recurse into keys in both;
- lists of equal length: recurse item by item; otherwise ``replace`` the whole list
  (defaults never resize a list, so the simple rule keeps patches small and obviously right);
- anything else: ``replace`` when the values differ, type included (``1`` vs ``true``).

Paths are RFC 6901 JSON Pointers (``~`` -> ``~0``, ``/`` -> ``~1``). Equal documents give
``[]``: no diff, no patch.
"""

from __future__ import annotations

from typing import Any

Operation = dict[str, Any]


def diff(before: Any, after: Any, path: str = "") -> list[Operation]:
    """The JSON Patch operations that turn ``before`` into ``after`` (see the module docstring)."""
    if isinstance(before, dict) and isinstance(after, dict):
        operations: list[Operation] = [
            {"op": "remove", "path": f"{path}/{escape(key)}"} for key in before if key not in after
        ]
        for key, value in after.items():
            child = f"{path}/{escape(key)}"
            if key in before:
                operations += diff(before[key], value, child)
            else:
                operations.append({"op": "add", "path": child, "value": value})
        return operations
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [op for index, (old, new) in enumerate(zip(before, after)) for op in diff(old, new, f"{path}/{index}")]
    if same_json(before, after):
        return []
    return [{"op": "replace", "path": path, "value": after}]


def escape(key: str) -> str:
    """A key as one JSON Pointer reference token (RFC 6901 section 3)."""
    return key.replace("~", "~0").replace("/", "~1")


def same_json(first: Any, second: Any) -> bool:
    """Equal as JSON values: ``1 == 1.0`` but ``1 != true`` (Python says ``1 == True``)."""
    if first is second:
        return True
    if isinstance(first, bool) or isinstance(second, bool):
        return type(first) is type(second) and first == second
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_json(first[k], second[k]) for k in first)
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(same_json(a, b) for a, b in zip(first, second))
    return type(first) in (int, float) and type(second) in (int, float) and first == second or (
        type(first) is type(second) and first == second
    )
