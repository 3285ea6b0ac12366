from __future__ import annotations

import pytest

from kd.core.params import ParamsError, Schedule, Scheme, parse_params
from kd.distill import schedules


def test_progress_runs_from_first_to_last_step() -> None:
    assert schedules.progress(0, 5) == 0.0
    assert schedules.progress(2, 5) == 0.5
    assert schedules.progress(4, 5) == 1.0
    assert schedules.progress(9, 5) == 1.0  # clamped past the end
    assert schedules.progress(0, 1) == 0.0  # a one-step run stays at the start
    with pytest.raises(ValueError):
        schedules.progress(0, 0)


def test_constant_and_linear() -> None:
    assert schedules.constant(2.0, None, 3, 10) == 2.0
    assert schedules.linear(4.0, 1.0, 0, 4) == 4.0
    assert schedules.linear(4.0, 1.0, 1, 4) == pytest.approx(3.0)
    assert schedules.linear(4.0, 1.0, 3, 4) == 1.0
    assert schedules.linear(0.0, 2.0, 1, 3) == pytest.approx(1.0)  # rising works too


def test_value_defaults_start_to_the_schemes_value() -> None:
    assert schedules.value(None, 3.0, 7, 10) == 3.0
    assert schedules.value(Schedule(), 3.0, 7, 10) == 3.0
    decay = Schedule(kind="linear", end=0.0)
    assert schedules.value(decay, 2.0, 0, 11) == 2.0
    assert schedules.value(decay, 2.0, 5, 11) == pytest.approx(1.0)
    ramp = Schedule(kind="linear", start=0.0, end=1.0)
    assert schedules.value(ramp, 5.0, 10, 11) == 1.0
    assert schedules.is_constant(None) and schedules.is_constant(Schedule())
    assert not schedules.is_constant(decay)


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="needs `end`"):
        Schedule(kind="linear")
    with pytest.raises(ValueError, match="no `end`"):
        Schedule(kind="constant", end=1.0)
    with pytest.raises(ValueError, match="does not list"):
        Scheme(terms={"logit": 1.0}, weight_schedules={"hidden": {"kind": "linear", "end": 1}})
    with pytest.raises(ValueError, match="> 0"):
        Scheme(terms={"logit": 1.0}, temperature_schedule={"kind": "linear", "end": 0.0})


def test_a_term_ramped_up_from_zero_is_active() -> None:
    scheme = Scheme(
        terms={"logit": 1.0, "hidden": 0.0},
        weight_schedules={"hidden": {"kind": "linear", "end": 1.0}},
    )
    assert scheme.active_terms == {"logit": 1.0, "hidden": 0.0}
    assert Scheme(terms={"logit": 1.0, "hidden": 0.0}).active_terms == {"logit": 1.0}


def test_schedule_errors_name_the_key() -> None:
    raw = {
        "loss": {
            "scheme": "a",
            "arms": ["a"],
            "schemes": {"a": {"terms": {"logit": 1.0}, "temperature_schedule": {"kind": "cosine"}}},
        }
    }
    with pytest.raises(ParamsError, match="loss.schemes.a.temperature_schedule.kind"):
        parse_params(raw)
