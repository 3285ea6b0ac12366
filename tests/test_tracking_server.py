"""Nothing lost through a real ``mlflow server``: down when a stage starts and up before its end,
and restarted in the middle of a stage (kd/core/tracking.py). Each point is counted per metric
key and step against what the stage logged."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.core import tracking

pytestmark = pytest.mark.slow  # three server starts

KEYS = ("loss/total", "grad/layer_0", "lr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(db: Path, port: int, workdir: Path, timeout_s: float = 120) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = (workdir / "server.log").open("a")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.5)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _log(run: tracking.Run, steps) -> None:
    for step in steps:
        run.log_metrics({"loss/total": 1 / step, "grad/layer_0": 0.1 * step, "lr": 1e-3}, step)


def _counts(db: Path, run_id: str) -> dict[str, list[int]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in KEYS}


@pytest.mark.long  # a real server started twice around a training stage
def test_a_server_down_at_the_start_and_restarted_mid_stage_loses_no_point(
    tmp_path, monkeypatch, capsys
) -> None:
    port, db = _free_port(), tmp_path / "server.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv(tracking.RETRY_ENV, "0")
    monkeypatch.setenv(tracking.FINAL_WAIT_ENV, "0")

    # Down when the stage starts, up before its end (and still up when it ends).
    with contextlib.ExitStack() as up:
        with tracking.start_run("train", params={"lr": 1e-3}, arm="logit") as late:
            _log(late, range(1, 4))
            assert late.run_id is None and late.pending == 9
            up.enter_context(_server(db, port, tmp_path))
            _log(late, range(4, 7))
            assert late.pending == 0
    assert _counts(db, late.run_id) == {k: list(range(1, 7)) for k in KEYS}

    # Restarted in the middle of a stage.
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        first.enter_context(_server(db, port, tmp_path))
        with tracking.start_run("train", arm="multi") as run:
            _log(run, range(1, 4))
            assert run.run_id is not None and run.pending == 0
            first.close()
            _log(run, range(4, 7))
            assert run.pending == 9
            second.enter_context(_server(db, port, tmp_path))
            _log(run, range(7, 10))
            assert run.pending == 0
    assert _counts(db, run.run_id) == {k: list(range(1, 10)) for k in KEYS}
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert {client.get_run(r.run_id).info.status for r in (late, run)} == {"FINISHED"}
    assert not (tmp_path / tracking.PENDING_DIR).exists()
    err = capsys.readouterr().err
    assert err.count("answers again") == 2, err
