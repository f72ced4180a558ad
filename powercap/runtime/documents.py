"""Reading Kubernetes documents from files: YAML or JSON, multi-document, ``kind: List``.

Shared by ``powercap validate``, the extender's and controller's snapshot files and the
agent's ``--policy`` file, so all of them accept the same input and name the same problems.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import yaml

from powercap.schema import SAFE_LOADER, json_type_of

LOAD_ERRORS = (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError)
"""What reading and parsing a file may raise; :func:`describe_load_error` words each."""


def read_text(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8")


def parse_documents(text: str) -> Iterator[Any]:
    """Every document of a YAML (or JSON) stream; a ``kind: List`` expands to its items."""
    if "\x00" in text:
        raise ValueError("binary data, not YAML or JSON text")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            documents: list[Any] = [json.loads(text)]
        except json.JSONDecodeError:
            documents = list(yaml.load_all(text, Loader=SAFE_LOADER))
    else:
        documents = list(yaml.load_all(text, Loader=SAFE_LOADER))
    for document in documents:
        if document is None:
            continue  # an empty document between two '---'
        if isinstance(document, dict) and document.get("kind") == "List":
            items = document.get("items")
            if items is None:
                continue  # an empty List, as kubectl prints one
            if not isinstance(items, list):
                raise ValueError(f"a List whose items is {json_type_of(items)}, not a list")
            yield from items
        else:
            yield document


def describe_load_error(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if isinstance(error, yaml.YAMLError):
        return f"invalid YAML: {error}"
    return str(error) or type(error).__name__
