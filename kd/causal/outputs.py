"""Where the causal family's outputs live.

The causal study is a pipeline of its own (causal/dvc.yaml, run by `dvc repro causal/dvc.yaml`):
its stages run only when asked for, so each one always computes its output. Everything sits
under ``paths.causal``; the headline metrics go to ``paths.metrics/causal.json``, which
causal/dvc.yaml declares as metrics beside the MLM family's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kd.core.io import atomic_dir

TEACHER, STUDENT_INIT, TOKENS, CACHE = "teacher", "student_init", "tokens", "cache"
REPORT, DISTILLED = "report", "distilled"  # causal_report's: report.md, the exported student
FLOOR = "student_init"  # the initial student's name among the evaluated models
PIPELINE = "causal/dvc.yaml"  # the causal study's stages, a pipeline of their own


def folder(p, *parts: str) -> Path:
    return p.paths.causal.joinpath(*parts)


def params_ok(p) -> Path:
    """causal_check_params' marker, which every causal stage depends on."""
    return folder(p, "params.ok")


def arm(p, name: str) -> Path:
    """The trained student of causal arm ``name``, with its train.json and train.csv."""
    return folder(p, "train", name)


def evaluation(p, name: str) -> Path:
    """The scores of arm ``name`` (or of the initial student, FLOOR) on the test blocks."""
    return folder(p, "eval", name)


def metrics(p) -> Path:
    return p.paths.metrics / "causal.json"


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """A temporary folder that replaces ``path`` when the block succeeds (a half-written output
    is never mistaken for a finished one)."""
    with atomic_dir(path) as tmp:
        yield tmp


def need(path: Path, stage: str) -> Path:
    """``path``, which causal stage ``stage`` wrote; one paragraph if it is missing."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `dvc repro {PIPELINE}:{stage}` first")
    return path
