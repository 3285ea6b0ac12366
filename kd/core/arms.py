"""Where each trained scheme's outputs live, and which schemes an experiment compares.

Two kinds of trained scheme:

- the arms (``loss.arms``, default logit and multi): one ``train@<arm>`` / ``evaluate@<arm>``
  stage each (DVC foreach), writing ``students/<arm>``, ``metrics/{train,eval}_<arm>.json`` and
  ``plots/{train,eval}_<arm>*.csv``;
- the scheme under study when it is not an arm (``dvc exp run -S loss.scheme=minilm``). DVC's
  foreach cannot iterate over "the arms plus one more value", so that scheme is trained and
  evaluated by ``train_scheme`` and ``evaluate_scheme``, whose outputs are fixed directories under
  ``paths.scheme``. When ``loss.scheme`` is an arm those two stages train nothing: they write a
  note naming the arm, and the arm's own stages stay cached.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from kd.core.io import atomic_dir, read_json, write_json

FLOOR = "student_init"  # the initial student, scored by evaluate_init
TEACHER = "teacher"  # the teacher's name among the probed models
NOTE = "note.json"  # what the scheme stages write when the scheme is an arm
STAGE = {"train": "train", "eval": "evaluate", "probe": "probe"}  # part -> the arm stages' name


@dataclass(frozen=True)
class Outputs:
    """The files one trained scheme (or the floor) is made of, and the stages that write them."""

    name: str
    student: Path
    train_json: Path
    train_csv: Path
    eval_json: Path
    eval_csv: Path
    train_stage: str
    eval_stage: str
    probe_json: Path
    probe_stage: str

    def eval_split_csv(self, split: str) -> Path:
        """One split's rows of ``eval_csv``: `dvc plots` cannot filter rows, overlays need them."""
        return self.eval_csv.with_name(f"{self.eval_csv.stem}_{split}.csv")


def of_arm(p, arm: str) -> Outputs:
    metrics, plots = p.paths.metrics, p.paths.plots
    return Outputs(
        arm,
        p.paths.students / arm,
        metrics / f"train_{arm}.json",
        plots / f"train_{arm}.csv",
        metrics / f"eval_{arm}.json",
        plots / f"eval_{arm}.csv",
        f"train@{arm}",
        f"evaluate@{arm}",
        p.paths.probe / f"{arm}.json",
        f"probe@{arm}",
    )


def of_floor(p) -> Outputs:
    out = of_arm(p, FLOOR)
    return replace(
        out, student=p.paths.student_init, eval_stage="evaluate_init", probe_stage="probe_init"
    )


def teacher_probe_json(p) -> Path:
    """Where probe_teacher writes the teacher's probe results."""
    return p.paths.probe / f"{TEACHER}.json"


def of_scheme(
    p, train_dir: Path | None = None, eval_dir: Path | None = None, probe_dir: Path | None = None
) -> Outputs:
    """The scheme stages' outputs; ``train_dir``/``eval_dir``/``probe_dir`` redirect them while
    writing."""
    t = train_dir or p.paths.scheme / "train"
    e = eval_dir or p.paths.scheme / "eval"
    r = probe_dir or p.paths.scheme / "probe"
    return Outputs(
        p.loss.scheme,
        t / "student",
        t / "train.json",
        t / "train.csv",
        e / "eval.json",
        e / "eval.csv",
        "train_scheme",
        "evaluate_scheme",
        r / "probe.json",
        "probe_scheme",
    )


def compared(p) -> list[Outputs]:
    """Every trained scheme of this experiment: the arms, then the scheme if it is not one."""
    out = [of_arm(p, a) for a in p.loss.arms]
    if p.loss.scheme not in p.loss.arms:
        out.append(of_scheme(p))
    return out


def headline(p) -> Outputs:
    return next(o for o in compared(p) if o.name == p.loss.scheme)


@contextlib.contextmanager
def writing(p, arm: str | None, part: str) -> Iterator[Outputs | None]:
    """The outputs a train/evaluate/probe stage writes its ``part`` ("train", "eval" or "probe")
    into.

    An arm's files are written in place, each atomically by its writer. The scheme stage writes
    into a temporary copy of its directory, renamed into place only when the block succeeds, so a
    half-written scheme is never mistaken for a finished one. When ``arm`` is None and the scheme
    is an arm, the stage writes its note and yields None: there is nothing to compute.
    """
    if arm is not None:
        if arm not in p.loss.arms:
            raise SystemExit(f"--arm {arm!r} is not in loss.arms {p.loss.arms}")
        yield of_arm(p, arm)
        return
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone writes
        yield None if p.loss.scheme in p.loss.arms else of_scheme(p)
        return
    with atomic_dir(p.paths.scheme / part) as tmp:
        if p.loss.scheme in p.loss.arms:
            write_json(
                tmp / NOTE,
                {"scheme": p.loss.scheme, "same_as": f"{STAGE[part]}@{p.loss.scheme}"},
            )
            print(f"loss.scheme {p.loss.scheme!r} is an arm: its {part} stage is "
                  f"{STAGE[part]}@{p.loss.scheme}; nothing to do here")
            yield None
            return
        yield of_scheme(p, **{f"{part}_dir": tmp})


def note(directory: Path) -> dict | None:
    """The note a scheme stage left instead of outputs, if any."""
    path = directory / NOTE
    return read_json(path) if path.exists() else None
