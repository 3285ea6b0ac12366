"""Values that change over training — the temperature, a term's weight — as pure functions of
(step, total_steps).

``step`` counts from 0 and the last step is ``total_steps - 1``, so a linear schedule uses exactly
``start`` on the first step and exactly ``end`` on the last: the ends a params.yaml names are the
values that train, not limits approached. A resumed run recomputes the value from its step, so
nothing about a schedule needs checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

from kd.core.params import Schedule


def progress(step: int, total_steps: int) -> float:
    """Where ``step`` lies in 0..total_steps-1, as 0..1 (clamped; 0 for a one-step run)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if total_steps == 1:
        return 0.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)


def constant(start: float, end: float | None, step: int, total_steps: int) -> float:
    """v(step) = start."""
    return start


def linear(start: float, end: float | None, step: int, total_steps: int) -> float:
    """v(step) = start + (end − start) · step / (total_steps − 1), clamped to [start, end]."""
    if end is None:
        raise ValueError("a linear schedule needs an end value")
    return start + (end - start) * progress(step, total_steps)


KINDS: dict[str, Callable[[float, float | None, int, int], float]] = {
    "constant": constant,
    "linear": linear,
}


def value(schedule: Schedule | None, default: float, step: int, total_steps: int) -> float:
    """The value of ``schedule`` at ``step``; ``default`` is its start when it names none (and
    the whole value when there is no schedule)."""
    if schedule is None:
        return default
    start = default if schedule.start is None else schedule.start
    return KINDS[schedule.kind](start, schedule.end, step, total_steps)


def final(schedule: Schedule | None, default: float) -> float:
    """The value on the last step, whatever the run's length (a linear schedule's ``end``)."""
    return value(schedule, default, 1, 2)


def is_constant(schedule: Schedule | None) -> bool:
    return schedule is None or schedule.kind == "constant"
