"""Where each trained scheme's outputs live, and which schemes an experiment compares.

The trained schemes are the arms (``loss.arms``, default logit and multi): one ``train@<arm>`` /
``evaluate@<arm>`` / ``probe@<arm>`` stage each (DVC foreach), writing ``students/<arm>``,
``train/<arm>.{json,csv}``, ``eval/<arm>*.{json,csv}`` and ``probe/<arm>.json``. ``loss.scheme``
names the arm whose student is the experiment's result; the gate refuses one that is not an arm
(``-S 'loss.arms=[logit,multi,minilm]' -S loss.scheme=minilm`` studies a third scheme), so every
stage of the DAG does work and a scheme is trained by exactly one stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FLOOR = "student_init"  # the initial student, scored by evaluate_init
TEACHER = "teacher"  # the teacher's name among the probed models


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


def compared(p) -> list[Outputs]:
    """Every trained scheme of this experiment: the arms, in ``loss.arms``' order."""
    return [of_arm(p, a) for a in p.loss.arms]


def headline(p) -> Outputs:
    """The arm named by ``loss.scheme`` (the gate checked it is an arm)."""
    return of_arm(p, p.loss.scheme)


def arm(p, name: str) -> Outputs:
    """``--arm NAME``'s outputs. Only the arm's own scheme is read: a stage that looked at
    loss.arms would have to declare it, and then adding an arm would rerun every other arm."""
    if name not in p.loss.schemes:
        raise SystemExit(f"--arm {name!r} is not a scheme of loss.schemes: use one of "
                         f"{sorted(p.loss.schemes)}")
    return of_arm(p, name)
