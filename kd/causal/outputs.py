"""Where the causal family's outputs live, and what its stages write when the family is off.

DVC's stages are fixed in dvc.yaml, so the causal_* stages are always in the DAG. With
``model.family: mlm`` (the default) each one writes a one-line note instead of its output and
finishes in seconds; ``dvc exp run -S model.family=causal`` reruns exactly them (no MLM stage
reads ``model.family``), so the MLM results stay as they were and the experiment holds both.

Everything sits under ``paths.causal``; the headline metrics go to
``paths.metrics/causal.json``, which dvc.yaml declares as metrics beside the MLM family's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kd.core.io import atomic_dir, read_json, write_json

NOTE = "note.json"
TEACHER, STUDENT_INIT, TOKENS, CACHE = "teacher", "student_init", "tokens", "cache"
REPORT, DISTILLED = "report", "distilled"  # causal_report's: report.md, the exported student
FLOOR = "student_init"  # the initial student's name among the evaluated models


def active(p) -> bool:
    return p.model.family == "causal"


def folder(p, *parts: str) -> Path:
    return p.paths.causal.joinpath(*parts)


def arm(p, name: str) -> Path:
    """The trained student of causal arm ``name``, with its train.json and train.csv."""
    return folder(p, "train", name)


def evaluation(p, name: str) -> Path:
    """The scores of arm ``name`` (or of the initial student, FLOOR) on the test blocks."""
    return folder(p, "eval", name)


def metrics(p) -> Path:
    return p.paths.metrics / "causal.json"


def note_text(family: str) -> dict:
    return {
        "family": family,
        "note": "model.family is not 'causal': this causal stage ran nothing. Run the causal "
        "experiment with `dvc exp run -S model.family=causal`",
    }


@contextlib.contextmanager
def writing(p, path: Path) -> Iterator[Path | None]:
    """A temporary folder that replaces ``path`` when the block succeeds (a half-written output
    is never mistaken for a finished one); with the causal family off, the folder holds only a
    note and None is yielded: the stage has nothing to compute."""
    with atomic_dir(path) as tmp:
        if not active(p):
            write_json(tmp / NOTE, note_text(p.model.family))
            print(f"model.family is {p.model.family!r}: {path} holds a note, nothing else")
            yield None
            return
        yield tmp


def need(path: Path, stage: str) -> Path:
    """``path``, which causal stage ``stage`` wrote; one paragraph if it is missing or a note."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `dvc repro {stage}` first")
    if (path / NOTE).exists():
        raise SystemExit(
            f"{path} holds a note, not an output: it was written with model.family "
            f"{read_json(path / NOTE)['family']!r}; run `dvc repro {stage}` with "
            "model.family: causal"
        )
    return path
