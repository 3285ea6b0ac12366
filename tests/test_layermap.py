from __future__ import annotations

import pytest

from kd.distill.layermap import resolve_layer_map, uniform_layer_map


@pytest.mark.parametrize(
    ("n_student", "n_teacher", "expected"),
    [
        (4, 6, [2, 3, 5, 6]),
        (4, 12, [3, 6, 9, 12]),
        (4, 4, [1, 2, 3, 4]),
        (2, 6, [3, 6]),
        (3, 12, [4, 8, 12]),
        (6, 4, [1, 2, 2, 3, 4, 4]),
    ],
)
def test_uniform(n_student: int, n_teacher: int, expected: list[int]) -> None:
    assert uniform_layer_map(n_student, n_teacher) == expected
    assert resolve_layer_map("uniform", n_student, n_teacher) == expected


def test_explicit_lists_pass_through() -> None:
    assert resolve_layer_map([1, 1, 4, 6], 4, 6) == [1, 1, 4, 6]
    assert resolve_layer_map([6, 6], 2, 6) == [6, 6]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ([2, 3, 5], "3 entries"),
        ([2, 3, 5, 6, 6], "5 entries"),
        ([2, 3, 5, 7], "entry 7"),
        ([0, 3, 5, 6], "entry 0"),
        ([2, 5, 3, 6], "decreases"),
        ("last", "'last'"),
    ],
)
def test_errors_name_layer_map(spec: str | list[int], fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve_layer_map(spec, 4, 6)
    message = str(err.value)
    assert "layer_map" in message and "params.yaml" in message
    assert fragment in message


def test_past_depth_message() -> None:
    with pytest.raises(ValueError, match="points past the teacher's 6 layers"):
        resolve_layer_map([2, 3, 5, 7], 4, 6)
