"""How a count reads: the noun and the words after it agree with the number."""

from __future__ import annotations

import pytest

from powercap.numeric import agreeing, counted


@pytest.mark.parametrize(
    "number, noun, plural, expected",
    [
        pytest.param(0, "GPU", None, "0 GPUs", id="none"),
        pytest.param(1, "GPU", None, "1 GPU", id="one"),
        pytest.param(2, "GPU", None, "2 GPUs", id="two"),
        pytest.param(1, "policy", "policies", "1 policy", id="one, irregular plural"),
        pytest.param(2, "policy", "policies", "2 policies", id="two, irregular plural"),
    ],
)
def test_counted(number: int, noun: str, plural: str | None, expected: str) -> None:
    assert counted(number, noun, plural) == expected


@pytest.mark.parametrize(
    "number, expected",
    [
        pytest.param(1, "1 GPU runs above its allocation", id="one"),
        pytest.param(2, "2 GPUs run above their allocation", id="two"),
        pytest.param(0, "0 GPUs run above their allocation", id="none"),
    ],
)
def test_agreeing_words_follow_the_count(number: int, expected: str) -> None:
    assert f"{counted(number, 'GPU')} {agreeing(number, 'runs above its', 'run above their')} allocation" == expected
