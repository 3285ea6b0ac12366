"""Where each trained scheme's outputs live, and which schemes an experiment compares.

Two kinds of trained scheme:

- the arms (``loss.arms``, default logit and multi): one ``train@<arm>`` / ``evaluate@<arm>`` /
  ``probe@<arm>`` stage each (DVC foreach), writing ``students/<arm>``, ``train/<arm>.{json,csv}``,
  ``eval/<arm>*.{json,csv}`` and ``probe/<arm>.json``;
- the scheme under study when it is not an arm (``dvc exp run -S loss.scheme=minilm``). DVC's
  foreach cannot iterate over "the arms plus one more value", so that scheme is trained and
  evaluated by ``train_scheme`` and ``evaluate_scheme``, whose outputs are fixed directories under
  ``paths.scheme``. When ``loss.scheme`` is an arm those two stages train nothing: they write a
  note naming the arm, and the arm's own stages stay cached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kd.core import dist as kdist
from kd.core.io import atomic_dir, read_json, write_json

FLOOR = "student_init"  # the initial student, scored by evaluate_init
TEACHER = "teacher"  # the teacher's name among the probed models
NOTE = "note.json"  # what the scheme stages write when the scheme is an arm
STAGE = {"train": "train", "eval": "evaluate", "probe": "probe"}  # part -> the arm stages' name


@dataclass(frozen=True)
class Outputs:
    """The files one trained scheme (or the floor) is made of, and the stages that write them.

    Each path is computed when it is asked for, from ``params.paths``: a stage then reads only
    the ``paths.*`` keys of the files it touches, which are its deps and outs in dvc.yaml
    (tests/test_dag_contract.py checks every key a stage reads is declared).
    """

    name: str
    train_stage: str
    eval_stage: str
    probe_stage: str
    where: Callable[[str], Path]  # "student", "train.json", "train.csv", ... -> its path

    @property
    def student(self) -> Path:
        return self.where("student")

    @property
    def train_json(self) -> Path:
        return self.where("train.json")

    @property
    def train_csv(self) -> Path:
        return self.where("train.csv")

    @property
    def eval_json(self) -> Path:
        return self.where("eval.json")

    @property
    def eval_csv(self) -> Path:
        return self.where("eval.csv")

    @property
    def probe_json(self) -> Path:
        return self.where("probe.json")

    def eval_split_csv(self, split: str) -> Path:
        """One split's rows of ``eval_csv``: `dvc plots` cannot filter rows, overlays need them."""
        return self.eval_csv.with_name(f"{self.eval_csv.stem}_{split}.csv")


def _per_kind(p, name: str, student: Callable[[], Path]) -> Callable[[str], Path]:
    """Where an arm's (or the floor's) files live: one folder per kind of result."""

    def where(part: str) -> Path:
        if part == "student":
            return student()
        kind, suffix = part.split(".")  # "eval.csv": paths.eval / "<name>.csv"
        return getattr(p.paths, kind) / f"{name}.{suffix}"

    return where


def of_arm(p, arm: str) -> Outputs:
    return Outputs(arm, f"train@{arm}", f"evaluate@{arm}", f"probe@{arm}",
                   _per_kind(p, arm, lambda: p.paths.students / arm))


def of_floor(p) -> Outputs:
    return Outputs(FLOOR, "init_student", "evaluate_init", "probe_init",
                   _per_kind(p, FLOOR, lambda: p.paths.student_init))


def teacher_probe_json(p) -> Path:
    """Where probe_teacher writes the teacher's probe results."""
    return p.paths.probe / f"{TEACHER}.json"


def of_scheme(
    p, train_dir: Path | None = None, eval_dir: Path | None = None, probe_dir: Path | None = None
) -> Outputs:
    """The scheme stages' outputs; ``train_dir``/``eval_dir``/``probe_dir`` redirect them while
    writing."""

    def where(part: str) -> Path:
        kind = "train" if part == "student" else part.split(".")[0]
        given = {"train": train_dir, "eval": eval_dir, "probe": probe_dir}[kind]
        folder = given or p.paths.scheme / kind
        return folder / ("student" if part == "student" else part)

    return Outputs(p.loss.scheme, "train_scheme", "evaluate_scheme", "probe_scheme", where)


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
        # Only the arm's own scheme is read: a stage that looked at loss.arms would have to
        # declare it, and then adding an arm would rerun every other arm.
        if arm not in p.loss.schemes:
            raise SystemExit(f"--arm {arm!r} is not a scheme of loss.schemes")
        yield of_arm(p, arm)
        return
    if kdist.rank() != 0:  # under torchrun, rank 0 alone writes
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
