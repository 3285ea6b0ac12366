"""Writing outputs so that a half-written one is never mistaken for a finished one; digests.

Every file or directory a stage declares as a DVC out is written to a temporary sibling and
renamed into place at the end: a rename within one filesystem is atomic, so a killed stage leaves
either the previous output or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def need(path: str | os.PathLike, stage: str) -> Path:
    """``path``, which ``stage`` writes; one paragraph naming that stage if it is missing."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the {stage} stage first (`dvc repro {stage}`)")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _finite(obj):
    # JSON has no NaN/inf; DVC and people both choke on them. Write null and let the reader see it.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as f:
        json.dump(_finite(obj), f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(path: str | os.PathLike) -> str:
    """SHA-256 over every file under ``path``, by relative name and content digest: what a
    folder holds, whatever its layout (a sharded model's several weight files, a dataset's
    Arrow files beside a schema-only JSON, 2,225 text files)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()
