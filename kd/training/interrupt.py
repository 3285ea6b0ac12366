"""Ctrl-C between optimisation steps, never inside one.

An interrupt that lands inside a step can leave the weights updated while the step counter is
not (or only some tensors updated: AdamW updates them one by one), and a checkpoint written then
would apply that step twice on resume. Inside :func:`deferred`, the first SIGINT or SIGTERM only
sets a flag; the training loop reads it between steps, checkpoints a consistent state and stops.
A second signal interrupts at once (``KeyboardInterrupt``): the loop then writes nothing, and
the last periodic checkpoint (``train.checkpoint_every``) is what a rerun resumes from.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Deferred:
    """Whether a stop was asked for, and by which signal."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def deferred(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[Deferred]:
    """Defer ``signals`` to the caller's next check of the yielded :class:`Deferred`."""
    state = Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield state  # only the main thread may set handlers; signals then behave as usual
        return

    def handler(signum, frame) -> None:
        if state.requested:  # the second one: stop now
            raise KeyboardInterrupt
        state.signal = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stopped(step: int, ckpt_dir) -> SystemExit:
    """What a training loop raises after the first signal, its step finished and checkpointed."""
    return SystemExit(
        f"interrupted at step {step}: checkpoint saved in {ckpt_dir}; rerun the stage "
        "(`dvc repro`) to resume"
    )


def stopped_again(step: int, ckpt_dir) -> SystemExit:
    """What a training loop raises on a second signal, inside step ``step + 1``: nothing saved."""
    return SystemExit(
        f"interrupted again during step {step + 1}: nothing saved now; a rerun of the stage "
        f"resumes from the last periodic checkpoint in {ckpt_dir}, or starts over"
    )
