"""Two gloo processes train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parent.parent


def run(cmd: list[str], tmp_path: Path, db: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def compare(a: dict, b: dict) -> None:
    # Tolerance: gloo's all-reduce sums gradients in another order than one process does, so
    # results agree to float32 rounding, amplified a little by four Adam steps.
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra["loss/total"] == pytest.approx(rb["loss/total"], rel=1e-4)
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.long
def test_two_processes_match_one(tmp_path):
    from mlflow import MlflowClient

    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, str(WORKER), str(one)], tmp_path, f"sqlite:///{tmp_path}/one.db")
    db2 = f"sqlite:///{tmp_path}/two.db"
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(WORKER),
            str(two),
        ],
        tmp_path,
        db2,
    )
    compare(torch.load(one / "result.pt"), torch.load(two / "result.pt"))
    # Only rank 0 tracks: one stage run (and its parent), with the full metric history.
    from kd.core.tracking import PIPELINE_RUNS, STAGE_RUNS

    client = MlflowClient(tracking_uri=db2)
    exp = client.get_experiment_by_name("kd-pipeline")
    runs = client.search_runs([exp.experiment_id], STAGE_RUNS)
    assert len(runs) == 1 and len(client.search_runs([exp.experiment_id], PIPELINE_RUNS)) == 1
    assert len(client.get_metric_history(runs[0].info.run_id, "loss/total")) == 4


@pytest.mark.slow
@pytest.mark.long  # two training processes
def test_gradient_accumulation_matches_full_batch(tmp_path):
    one, acc = tmp_path / "one", tmp_path / "acc"
    run([sys.executable, str(WORKER), str(one)], tmp_path, f"sqlite:///{tmp_path}/a.db")
    run([sys.executable, str(WORKER), str(acc), "2"], tmp_path, f"sqlite:///{tmp_path}/b.db")
    compare(torch.load(one / "result.pt"), torch.load(acc / "result.pt"))


@pytest.mark.slow
@pytest.mark.long
def test_the_causal_family_on_two_processes_matches_one(tmp_path):
    """The causal multi arm, its logit term from the teacher cache (each rank reads its own
    rows), with attribution steps: 2 gloo processes equal 1, as the MLM family's do."""
    from tiny import write_causal_cache

    write_causal_cache(tmp_path / "cache")
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, str(WORKER), str(one), "0", str(tmp_path / "cache")], tmp_path,
        f"sqlite:///{tmp_path}/one.db")  # fmt: skip
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(WORKER), str(two), "0", str(tmp_path / "cache")], tmp_path,
        f"sqlite:///{tmp_path}/two.db")  # fmt: skip
    compare(torch.load(one / "result.pt"), torch.load(two / "result.pt"))


@pytest.mark.slow
@pytest.mark.long  # two training processes
def test_causal_gradient_accumulation_matches_full_batch(tmp_path):
    from tiny import write_causal_cache

    write_causal_cache(tmp_path / "cache")
    one, acc = tmp_path / "one", tmp_path / "acc"
    for out, micro in ((one, "0"), (acc, "1")):
        run([sys.executable, str(WORKER), str(out), micro, str(tmp_path / "cache")], tmp_path,
            f"sqlite:///{tmp_path}/{out.name}.db")  # fmt: skip
    compare(torch.load(one / "result.pt"), torch.load(acc / "result.pt"))
