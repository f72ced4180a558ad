"""Limits on the shape of a JSON document, checked on its bytes before it is decoded.

Decoding a JSON body into Python objects costs far more memory than its bytes (a list of
a million small numbers is 2-3 MB of JSON and over 100 MB of Python), and code that walks
the objects (deep copies, validators, JSON Patch diffs) recurses once per level of
nesting. :func:`check_json_limits` refuses a document whose

- nesting is deeper than ``max_depth`` (``[[1]]`` is 2 deep),
- arrays or objects have more than ``max_items`` entries (elements or members), or
- total number of values (every scalar, array and object) exceeds ``max_values``,

without building any object: the document is read in slices of :data:`SLICE_BYTES`; in
each, escapes are dropped, the text between quotes (the strings) is cut out with
``bytes.split`` and ``bytes.translate`` keeps only ``[]{},`` of the rest; the remaining
structure is then peeled one level of innermost containers at a time (``[,,]`` is a
3-item array). Every step is a C-speed scan; the peeling runs on at most ``2 x
max_values`` bytes once the value count has been checked, and memory stays within a few
times :data:`SLICE_BYTES` plus the structure (a 3 MiB body: tens of milliseconds and a few
MB at worst).

Counts are upper bounds for malformed documents (an unterminated string's contents count
as structure); such a document is refused either way, by these limits or by the decoder.
Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SLICE_BYTES = 256 * 1024
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b"[]{},")
_INNERMOST = re.compile(rb"\[,*\]|\{,*\}")


@dataclass(frozen=True)
class JsonLimits:
    """The largest JSON document shape accepted (module docstring)."""

    max_depth: int
    max_items: int
    max_values: int

    def __post_init__(self) -> None:
        if min(self.max_depth, self.max_items, self.max_values) < 1:
            raise ValueError("JSON limits must be at least 1")


def _structure(document: memoryview) -> bytes:
    """The ``[]{},`` of ``document`` outside its strings, in order."""
    pieces = []
    in_string = False
    start = 0
    while start < len(document):
        end = min(start + SLICE_BYTES, len(document))
        while end < len(document) and document[end - 1] == 0x5C:  # never split a run of backslashes
            end += 1
        piece = bytes(document[start:end])
        if b"\\" in piece:
            piece = _ESCAPE.sub(b"", piece)
        parts = piece.split(b'"')
        pieces.append(b"".join(parts[1 if in_string else 0::2]).translate(None, _NOT_STRUCTURE))
        in_string ^= (len(parts) - 1) % 2 == 1
        start = end
    return b"".join(pieces)


class JsonLimitExceeded(ValueError):
    """A document breaks one of the limits; ``limit`` is ``depth``, ``items`` or ``values``
    and the message names it and its value."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


def check_json_limits(document: bytes | bytearray | memoryview, limits: JsonLimits, what: str = "the JSON document") -> None:
    """Raise :class:`JsonLimitExceeded` when ``document`` breaks ``limits``; ``what`` names
    the document in the message (``"the AdmissionReview"``)."""
    structure = _structure(memoryview(document).cast("B"))
    containers = structure.count(b"[") + structure.count(b"{")
    values_at_most = 1 + structure.count(b",") + containers
    if values_at_most > limits.max_values:
        raise JsonLimitExceeded("values", f"{what} has more than {limits.max_values} JSON values (the limit)")
    long_run = re.compile(b",{%d}" % limits.max_items)
    depth = 0
    while structure:
        if long_run.search(structure):
            raise JsonLimitExceeded("items", f"{what} has an array or object with more than {limits.max_items} entries (the limit)")
        peeled = _INNERMOST.sub(b"", structure)
        if len(peeled) == len(structure):
            return  # unbalanced: not JSON, which the decoder reports with its position
        depth += 1
        if depth > limits.max_depth:
            raise JsonLimitExceeded("depth", f"{what} is nested more than {limits.max_depth} levels deep (the limit)")
        structure = peeled

