"""Sharded training (base.parallel: fsdp, kd/training/sharded.py) and the multi-node launcher.

The slow tests run tests/ddp_worker.py under torchrun on 2 gloo processes; the fast ones check
the gate's refusals and the launcher's commands.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd.core import dist as kdist
from kd.core.params import Base, CausalTrain, Train, sharding_problem
from kd.training import launch

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run(cmd: list[str], tmp_path: Path, db: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1", **env}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def worker(tmp_path: Path, out: Path, nproc: int, *args: str, **env: str) -> dict:
    launcher = [*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = run([*(launcher or [sys.executable]), str(WORKER), str(out), *args], tmp_path,
               f"sqlite:///{tmp_path}/{out.name}.db", **env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "result.pt")


def compare(a: dict, b: dict, rel: float = 1e-4) -> None:
    """Two runs of the same optimisation whose reductions sum in another order (gloo's
    all-reduce for DDP, its reduce-scatter for FSDP, one process's own sums): float32 rounding
    (~1e-7 relative), amplified a little by a few Adam steps; 1e-4 leaves two orders of margin
    (measured: the curves agree to ~3e-7) and would still catch a norm taken over one shard (off
    by ~sqrt(2)) or a gradient left unreduced."""
    assert len(a["rows"]) == len(b["rows"])
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        keys = [k for k in ra if k.startswith(("loss/", "grad_norm/"))]
        assert keys and set(keys) <= set(rb)
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-7), (ra["step"], k)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=1e-3, atol=1e-5, msg=k)


# --- fast: the gate and the launcher ----------------------------------------------------------


def test_the_gate_refuses_attribution_under_fsdp_and_a_sharded_teacher_under_ddp():
    fsdp = Base(parallel="fsdp")
    assert "train.attribution_every: 0" in sharding_problem(Train(), fsdp)
    assert "causal.train.attribution_every: 0" in sharding_problem(CausalTrain(), fsdp)
    assert sharding_problem(Train(attribution_every=0), fsdp) is None
    assert sharding_problem(Train(), Base()) is None
    with pytest.raises(ValueError, match="base.parallel: fsdp"):
        Base(shard_teacher=True)


def test_the_checkpoint_identity_leaves_out_the_process_count_only():
    assert kdist.identity(Base(nproc=4)) == kdist.identity(Base(nproc=1))
    assert kdist.identity(Base(parallel="fsdp")) != kdist.identity(Base())


def test_the_launcher_runs_one_process_in_place_and_more_under_torchrun():
    assert launch.command("stages.train", [], 1, {})[0] is None
    assert launch.command("stages.train", [], 2, {"WORLD_SIZE": "2"})[0] is None  # a worker
    cmd, _ = launch.command("stages.train", ["--arm", "x"], 2, {})
    assert cmd[1:] == ["--standalone", "--nproc-per-node=2", "-m", "stages.train", "--arm", "x"]


def test_the_launcher_joins_a_multi_node_job_from_torchruns_variables():
    env = {"PET_NNODES": "2", "PET_RDZV_ENDPOINT": "head:29500", "PET_RDZV_ID": "job7"}
    cmd, out = launch.command("stages.train", [], 1, env)  # one process per node, two nodes
    assert cmd[1:] == ["--nproc-per-node=1", "-m", "stages.train"]  # torchrun reads PET_*
    assert out["PET_RDZV_BACKEND"] == "c10d" and out["PET_RDZV_ID"] == "job7"
    assert launch.command("m", [], 1, {**env, "PET_RDZV_BACKEND": "static"})[1][
        "PET_RDZV_BACKEND"] == "static"  # fmt: skip
    with pytest.raises(SystemExit, match="PET_RDZV_ENDPOINT"):
        launch.command("m", [], 1, {"PET_NNODES": "2"})
    with pytest.raises(SystemExit, match="base.nproc=2"):
        launch.command("m", [], 2, {**env, "PET_NPROC_PER_NODE": "4"})
    with pytest.raises(SystemExit, match="not a node count"):
        kdist.nodes({"PET_NNODES": "two"})
    assert kdist.nodes({"PET_NNODES": "2:4"}) == 2


# --- slow: 2 gloo processes -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.long
def test_fsdp_matches_ddp_with_the_same_layer_norms(tmp_path):
    """MLM family, the teacher sharded too: the same losses, the same per-layer gradient norms
    (taken over whole gradients from the shards) and the same final weights as DDP's."""
    ddp = worker(tmp_path, tmp_path / "ddp", 2)
    fsdp = worker(tmp_path, tmp_path / "fsdp", 2, KD_TEST_PARALLEL="fsdp",
                  KD_TEST_SHARD_TEACHER="1")  # fmt: skip
    assert any(k.startswith("grad_norm/layer_") for k in fsdp["rows"][0])
    compare(fsdp, ddp)


@pytest.mark.slow
@pytest.mark.long
def test_the_causal_family_under_fsdp_matches_ddp(tmp_path):
    from tiny import write_causal_cache

    write_causal_cache(tmp_path / "cache")
    cache = str(tmp_path / "cache")
    ddp = worker(tmp_path, tmp_path / "ddp", 2, "0", cache)
    fsdp = worker(tmp_path, tmp_path / "fsdp", 2, "0", cache, KD_TEST_PARALLEL="fsdp")
    compare(fsdp, ddp)


@pytest.mark.slow
@pytest.mark.long
def test_a_killed_fsdp_run_resumes_exactly_and_under_another_process_count(tmp_path):
    """Every process SIGKILLs itself as it logs step 3 (after the step-2 DCP checkpoint): the
    rerun on 2 processes gives the uninterrupted run's rows bit for bit; the same checkpoint
    resumed by 1 process gives them to float rounding (its sums run in another order)."""
    env = {"KD_TEST_PARALLEL": "fsdp", "KD_TEST_STEPS": "6", "KD_TEST_CKPT_EVERY": "2"}
    whole = worker(tmp_path, tmp_path / "whole", 2, **env)
    cut = tmp_path / "cut"
    killed = run([*TORCHRUN, "--standalone", "--nproc-per-node=2", str(WORKER), str(cut)],
                 tmp_path, f"sqlite:///{tmp_path}/cut.db", **env, KD_TEST_DIE_AT="3")  # fmt: skip
    assert killed.returncode != 0 and not (cut / "result.pt").exists()
    assert sorted(p.name for p in (cut / "ckpt").iterdir()) == ["checkpoint.pt", "sharded-2"]
    shutil.copytree(cut, tmp_path / "cut1")  # the same checkpoint, for 1 process
    resumed = worker(tmp_path, cut, 2, **env)
    assert resumed["resumed"]
    assert [r["loss/total"] for r in resumed["rows"]] == [r["loss/total"] for r in whole["rows"]]
    assert resumed["rows"] == whole["rows"]
    for k in whole["state"]:
        assert torch.equal(resumed["state"][k], whole["state"][k]), k
    on_one = worker(tmp_path, tmp_path / "cut1", 1, **env)
    assert on_one["resumed"]
    compare(on_one, whole)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.long
def test_two_nodes_through_the_launcher_match_one_process(tmp_path):
    """Two launcher agents on this machine, one process each, meet at a c10d rendezvous on
    127.0.0.1 (as two nodes would at the head node's address) and train as one world of 2."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")  # base.nproc: 1 per node
    one = worker(tmp_path, tmp_path / "one", 1)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/nodes.db", "PYTHONPATH":
           f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "PET_NNODES": "2",
           "PET_RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}", "PET_RDZV_ID": "kd-test"}  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    cmd = [sys.executable, "-m", "kd.training.launch", "ddp_worker", str(tmp_path / "two")]
    agents = [subprocess.Popen(cmd, cwd=tmp_path, env={**base, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    logs = [a.communicate(timeout=600)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n".join(x[-2000:] for x in logs)
    two = torch.load(tmp_path / "two" / "result.pt")
    compare(two, one)
