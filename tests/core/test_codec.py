"""JSON helpers: the nesting bound."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.codec import too_deep


def dicts(levels: int) -> Any:
    """Objects nested ``levels`` deep around a scalar."""
    value: Any = "leaf"
    for _ in range(levels):
        value = {"k": value}
    return value


def lists(levels: int) -> Any:
    """Arrays nested ``levels`` deep around a scalar."""
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("build", [dicts, lists])
def test_limit_is_inclusive(build: Any) -> None:
    """A value nesting exactly ``limit`` levels passes; one more level is too deep."""
    assert not too_deep(build(32), 32)
    assert too_deep(build(33), 32)
    assert too_deep(build(2000), 32)


def test_scalars_and_empty_containers() -> None:
    """Scalars have no depth; an empty object or array is one level."""
    for scalar in (None, 1, "x", 1.5, True):
        assert not too_deep(scalar, 0)
    assert too_deep({}, 0)
    assert too_deep([], 0)
    assert not too_deep({}, 1)
    assert not too_deep({"a": 1, "b": "s", "c": None}, 1)


def test_deepest_branch_counts() -> None:
    """Mixed objects and arrays are measured along their deepest branch, wherever it is."""
    shallow = {"a": [1, {"b": 2}], "c": {"d": [3]}}
    assert not too_deep(shallow, 3)
    assert too_deep(shallow, 2)
    wide = [{"x": 1}] * 50 + [{"y": lists(30)}]
    assert not too_deep(wide, 32)
    assert too_deep(wide, 31)
    assert too_deep({"first": dicts(40), "rest": [1] * 10}, 32)
