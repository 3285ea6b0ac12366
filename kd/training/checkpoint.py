"""Resumable training checkpoints.

A checkpoint holds everything the next step depends on: model and projection weights, optimiser
and scheduler state, the step, the RNG state (dropout draws from it), the rows logged so far and
the MLflow run id, so an interrupted stage resumes exactly where it stopped. It also holds a
fingerprint of the configuration that produced it; a checkpoint from other params, another
teacher or another initial student is ignored rather than silently continued.

Checkpoints live outside DVC's outs (DVC deletes a stage's outs before rerunning it) and are
written by temp-file-and-rename, so a kill during the write leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

FILE = "checkpoint.pt"


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save(directory: str | os.PathLike, state: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / FILE)


def load(directory: str | os.PathLike, expected_fingerprint: str) -> dict | None:
    path = Path(directory) / FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint means: start over
        print(f"warning: ignoring unreadable checkpoint {path} ({err}); starting over", file=sys.stderr)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        print(
            f"note: {path} was written with other params, teacher or initial student; "
            "starting over",
            file=sys.stderr,
        )
        return None
    return state


def remove(directory: str | os.PathLike) -> None:
    path = Path(directory) / FILE
    if path.exists():
        path.unlink()
    # FSDP's DCP shards beside it (kd/training/sharded.py), useless without it.
    for shards in Path(directory).glob("sharded-*"):
        shutil.rmtree(shards, ignore_errors=True)
