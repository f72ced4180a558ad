"""``powercap.runtime.jsonlimits``: the shape of a JSON document read from its bytes, without
decoding it, agrees with the decoded document, strings (quotes, escapes, brackets inside
them) and slice boundaries included."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from powercap.runtime import jsonlimits
from powercap.runtime.jsonlimits import JsonLimitExceeded, JsonLimits, check_json_limits

TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('ab"\\[]{},:\u00e9\n')), max_size=12)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(TRICKY_TEXT, children, max_size=6),
    max_leaves=60,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def widest(value: Any) -> int:
    children = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    return max([len(children), *(widest(v) for v in children)])


def count(value: Any) -> int:
    children = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    return 1 + sum(count(v) for v in children)


def shape_limit(document: bytes, limits: JsonLimits) -> str | None:
    try:
        check_json_limits(document, limits)
    except JsonLimitExceeded as exceeded:
        return exceeded.limit
    return None


@settings(max_examples=300, deadline=None)
@given(VALUES, st.sampled_from([1, 2, 7, 4096]))
def test_depth_and_entries_are_exact_whatever_the_strings_hold(value: Any, slice_bytes: int) -> None:
    document = json.dumps(value, ensure_ascii=False).encode()
    true_depth, true_widest = depth(value), widest(value)
    original = jsonlimits.SLICE_BYTES
    jsonlimits.SLICE_BYTES = slice_bytes  # slices that cut strings, escapes and brackets anywhere
    try:
        roomy = 10**6
        assert shape_limit(document, JsonLimits(max_depth=roomy, max_items=roomy, max_values=roomy)) is None
        assert shape_limit(document, JsonLimits(max_depth=max(true_depth, 1), max_items=roomy, max_values=roomy)) is None
        if true_depth > 1:
            assert shape_limit(document, JsonLimits(max_depth=true_depth - 1, max_items=roomy, max_values=roomy)) == "depth"
        assert shape_limit(document, JsonLimits(max_depth=roomy, max_items=max(true_widest, 1), max_values=roomy)) is None
        if true_widest > 1:
            assert shape_limit(document, JsonLimits(max_depth=roomy, max_items=true_widest - 1, max_values=roomy)) == "items"
        assert shape_limit(document, JsonLimits(max_depth=roomy, max_items=roomy, max_values=2 * count(value))) is None
    finally:
        jsonlimits.SLICE_BYTES = original


@pytest.mark.parametrize(
    ("document", "limit"),
    [
        pytest.param(b"[" * 65 + b"]" * 65, "depth", id="65-levels"),
        pytest.param(b"[" * 64 + b"]" * 64, None, id="64-levels"),
        pytest.param(json.dumps(list(range(1025))).encode(), "items", id="1025-elements"),
        pytest.param(json.dumps(list(range(1024))).encode(), None, id="1024-elements"),
        pytest.param(json.dumps({str(i): 0 for i in range(1025)}).encode(), "items", id="1025-members"),
        pytest.param(json.dumps([[0] * 1000] * 21).encode(), "values", id="21000-values"),
        pytest.param(json.dumps(["[[[[" * 100, "]]]]" * 100, '\\"' * 100]).encode(), None, id="brackets-in-strings"),
        pytest.param(b"5", None, id="a-scalar"),
    ],
)
def test_limits_table(document: bytes, limit: str | None) -> None:
    assert shape_limit(document, JsonLimits(max_depth=64, max_items=1024, max_values=20_000)) == limit


def test_the_messages_name_the_document_and_the_limit() -> None:
    with pytest.raises(JsonLimitExceeded, match=r"^the AdmissionReview is nested more than 2 levels deep \(the limit\)$"):
        check_json_limits(b"[[[]]]", JsonLimits(max_depth=2, max_items=9, max_values=99), "the AdmissionReview")


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError):
        JsonLimits(max_depth=0, max_items=1, max_values=1)
