"""The whole DAG run by DVC itself on tiny assets: outputs, experiments, faults, reproducibility.

One `dvc repro` (the session fixture `tiny_pipeline` in conftest.py) is shared by every test;
a test that changes anything works on a clone of that repository.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kd.core.io import read_json
from kd.core.tracking import EXPERIMENT, STAGE_RUNS
from kd.report import seeds

pytestmark = pytest.mark.slow

ARMS = ("logit", "multi")
# The stages this file knows about; dvc.yaml may hold more (they must run and track too).
CORE_STAGES = {
    "sample_corpus",
    "tokenize",
    "prepare_teacher",
    "init_student",
    "train@logit",
    "train@multi",
    "evaluate@logit",
    "evaluate@multi",
    "evaluate_init",
    "report",
}
RESUME_STEPS = 300  # train.max_steps of the run that is killed and resumed


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def _run(repo, *cmd: str, env: dict | None = None, timeout: float = 600):
    """(exit status, stdout, stderr) of ``cmd`` in ``repo``; ``dvc`` goes through this Python."""
    if cmd[0] == "dvc":
        cmd = (sys.executable, "-m", "dvc", *cmd[1:])
    out = subprocess.run(
        cmd, cwd=repo.path, env=env or repo.env, capture_output=True, text=True, timeout=timeout
    )
    return out.returncode, out.stdout, out.stderr


def _stages(repo) -> set[str]:
    from dvc.repo import Repo

    # The MLM pipeline only: a plain `dvc repro` is `dvc repro dvc.yaml`; causal/dvc.yaml is
    # its own pipeline, reproduced by name.
    with Repo(str(repo.path)) as dvc:
        return {stage.name for stage in dvc.index.graph if stage.path == dvc.root_dir + "/dvc.yaml"}


def _downstream(repo, *names: str) -> set[str]:
    """Every stage that depends, directly or not, on one of the stages ``names``."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo.path)) as dvc:
        graph = dvc.index.graph  # edges point from a stage to the stages it depends on
        return {
            s.name
            for stage in graph
            if stage.name in names
            for s in nx.ancestors(graph, stage)
        }


def _set_params(path: Path, **sections: dict) -> None:
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _weights(repo, arm: str) -> bytes:
    return (repo.path / "data" / "students" / arm / "model.safetensors").read_bytes()


def _train_csv(repo, arm: str) -> pd.DataFrame:
    return pd.read_csv(repo.path / "data" / "train" / f"{arm}.csv")


@pytest.fixture(scope="module")
def twin(tiny_pipeline, tmp_path_factory):
    """A second fresh copy of the never-reproduced repository, reproducing the whole DAG.

    Started in the background by the first test that asks for it, so on two cores it overlaps
    with the tests that follow.
    """
    repo = tiny_pipeline.clone(tiny_pipeline.pristine, tmp_path_factory.mktemp("twin") / "repo")
    log = (repo.path.parent / "repro.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=repo.path,
        env=repo.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield repo, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def test_repro_builds_everything_then_is_up_to_date(tiny_pipeline) -> None:
    repo = tiny_pipeline.repo
    stages = _stages(repo)
    assert CORE_STAGES <= stages
    assert _ran(tiny_pipeline.repro_out) == stages, tiny_pipeline.repro_out
    data = repo.path / "data"

    headline = read_json(data / "metrics" / "eval.json")
    for key in ("test/logit_kl_t1", "train/logit_kl_t1", "test/mlm_top1", "train_final_loss"):
        assert isinstance(headline[key], float) and math.isfinite(headline[key]), key
    compared = read_json(data / "metrics" / "comparison.json")
    numbers = {
        k: v for k, v in compared.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    assert numbers and all(math.isfinite(v) for v in numbers.values())
    # Scheme-neutral headline keys carry the headline arm's values.
    assert headline["scheme"] == "multi"
    assert headline["test/logit_kl_t1"] == compared["arms/multi/test/logit_kl_t1"]
    assert headline["runtime"]["threads"] == 1 and headline["runtime"]["device"] == "cpu"

    report = data / "report"
    assert (report / "report.md").read_text().strip()
    pngs = sorted(report.glob("*.png"))
    assert pngs and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs), pngs
    for name in (p.name for p in pngs):
        assert name in (report / "report.md").read_text(), f"{name} is not in report.md"
    assert (data / "distilled" / "model.safetensors").is_file()
    assert (data / "distilled" / "model.safetensors").read_bytes() == _weights(repo, "multi")
    # Its model card states eval.json's numbers (kd/report/card.py).
    card = yaml.safe_load((data / "distilled" / "README.md").read_text().split("---")[1])
    stated = {m["type"] + ":" + m["name"]: m["value"]
              for r in card["model-index"][0]["results"] for m in r["metrics"]}
    assert stated["kl_divergence:KL(teacher ‖ student) at T = 1, masked positions"] == round(
        headline["test/logit_kl_t1"], 4)
    assert any(k.startswith("accuracy:linear probe") for k in stated), stated
    for arm in ARMS:
        assert (data / "students" / arm / "model.safetensors").is_file(), arm
        assert read_json(data / "train" / f"{arm}.json")["steps"] == 6
        assert (data / "eval" / f"{arm}.json").is_file()
    # Training finished, so no checkpoint is left behind.
    assert not list((data / "checkpoints").rglob("checkpoint.pt"))

    # Every stage tracked into the repository's own database (DVC_ROOT), not the caller's.
    client = MlflowClient(tracking_uri=f"sqlite:///{repo.path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], STAGE_RUNS)
    names = sorted(r.info.run_name for r in runs)
    # check_params only validates: it has no run of its own.
    quiet = {"evaluate_init", "check_params", "pin_inputs", "plots", "probe_teacher", "probe_init"}
    # The causal stages are a pipeline of their own (causal/dvc.yaml), which `dvc repro` leaves.
    quiet |= {s for s in stages if s.startswith("causal_")}
    expected = (stages - quiet) | {"evaluate@student_init", "probe@teacher", "probe@student_init"}
    assert names == sorted(expected)
    assert {r.info.status for r in runs} == {"FINISHED"}

    again = repo.run("dvc", "repro")
    assert _ran(again) == set(), again
    assert "Data and pipelines are up to date." in again


@pytest.mark.long
def test_scheme_only_experiment_reruns_only_report(twin, tiny_experiment) -> None:
    # (twin: started here, the first `long` test, so its repro overlaps with the next ones)
    repo, out = tiny_experiment.repo, tiny_experiment.out
    baseline = tiny_experiment.baseline["eval.json"]
    compared = tiny_experiment.baseline["comparison.json"]
    print(out)  # what DVC printed, for the record (pytest -s)
    assert "Running stage 'report'" in out, out
    assert "Running stage 'train@" not in out and "Running stage 'evaluate@" not in out, out
    # Besides the report, only what consumes its export (data/distilled) may rerun.
    # check_params reruns on any change of params (it is cheap and touches nothing downstream).
    cheap = {"report", "check_params"}
    assert _ran(out) - cheap <= _downstream(repo, "report"), out
    assert not (repo.path / "data" / "scheme").exists()  # no stage writes a note any more
    result = read_json(repo.path / "data" / "metrics" / "eval.json")
    assert result["scheme"] == "logit"
    assert result["test/logit_kl_t1"] == compared["arms/logit/test/logit_kl_t1"]
    assert (repo.path / "data" / "distilled" / "model.safetensors").read_bytes() == _weights(
        repo, "logit"
    )

    # What MLflow holds after this experiment: tests/test_mlflow_server.py, through a server.
    rows = {r.label: r.metrics for r in seeds.parse_rows(seeds.exp_show(repo.path)) if r.metrics}
    schemes = {name: r.get("scheme") for name, r in rows.items()}
    assert "workspace" in rows and len(rows) >= 3, schemes  # workspace, baseline, experiment
    assert sorted(schemes.values()).count("logit") >= 2 and "multi" in schemes.values(), schemes
    # The same scheme-neutral columns in every row. DVC leaves out null values (the logit arm
    # has no learned projections), so those are the only keys one row may lack.
    nulls = {k for k, v in result.items() if v is None}
    for name, row in rows.items():
        assert set(row) | nulls == set(baseline) | nulls, name
        for key in ("test/logit_kl_t1", "train/logit_kl_t1", "test/mlm_top1", "train_final_loss"):
            assert math.isfinite(row[key]), (name, key)

    with_plots = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "diff", "--json"],
        cwd=repo.path,
        env=repo.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert with_plots.returncode == 0, with_plots.stderr
    plots = json.loads(with_plots.stdout)
    assert {"total_loss", "eval_train_logit_loss", "eval_test_logit_loss"} <= set(plots["data"])


@pytest.mark.long
def test_a_third_arm_trains_alone_and_can_be_the_headline(tiny_pipeline, tmp_path) -> None:
    """`dvc exp run -S 'loss.arms=[logit,multi,minilm]' -S loss.scheme=minilm` trains, scores and
    probes minilm through its own arm stages, keeps both other arms cached, and makes it the
    headline; a scheme outside the arms is refused by the gate before anything is deleted."""
    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    before = {arm: _weights(repo, arm) for arm in ARMS}

    refused = repo.run("dvc", "exp", "run", "-S", "loss.scheme=minilm", check=False)
    assert "-S 'loss.arms=[logit,multi,minilm]'" in refused, refused
    assert {arm: _weights(repo, arm) for arm in ARMS} == before

    out = repo.run("dvc", "exp", "run", "-S", "loss.arms=[logit,multi,minilm]",
                   "-S", "loss.scheme=minilm")  # fmt: skip
    ran = _ran(out)
    assert {"train@minilm", "evaluate@minilm", "probe@minilm", "report"} <= ran, out
    assert not {f"{s}@{a}" for s in ("train", "evaluate", "probe") for a in ARMS} & ran, out
    assert {arm: _weights(repo, arm) for arm in ARMS} == before

    assert read_json(repo.path / "data" / "train" / "minilm.json")["steps"] == 6
    assert "loss/minilm_attention" in pd.read_csv(repo.path / "data" / "train" / "minilm.csv").columns
    result = read_json(repo.path / "data" / "metrics" / "eval.json")
    assert result["scheme"] == "minilm"
    compared = read_json(repo.path / "data" / "metrics" / "comparison.json")
    assert result["test/logit_kl_t1"] == compared["arms/minilm/test/logit_kl_t1"]
    assert math.isfinite(compared["arms/logit/test/logit_kl_t1"])
    assert (repo.path / "data" / "distilled" / "model.safetensors").read_bytes() == _weights(
        repo, "minilm"
    )
    assert "minilm" in (repo.path / "data" / "report" / "report.md").read_text()
    assert math.isfinite(compared["arms/minilm/probe_linear_acc"])


@pytest.mark.long
def test_one_arms_parameter_retrains_only_that_arm(tiny_pipeline, tmp_path) -> None:
    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    before = read_json(repo.path / "data" / "train" / "logit.json")

    out = repo.run("dvc", "exp", "run", "-S", "loss.schemes.multi.terms.attention=0.5")
    arm = {"train@multi", "evaluate@multi", "probe@multi", "report"}
    assert arm <= _ran(out) <= arm | _downstream(repo, "train@multi") | {"check_params"}, out
    assert not {"train@logit", "evaluate@logit", "evaluate_init"} & _ran(out), out
    assert read_json(repo.path / "data" / "train" / "logit.json") == before
    multi = read_json(repo.path / "data" / "train" / "multi.json")
    assert multi["steps"] == 6 and math.isfinite(multi["final/loss/attention"])


@pytest.fixture(scope="module")
def _bad_input_repo(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    # A teacher folder holding only its config (the worst case of issue #15: it used to pass the
    # gate, rewrite the whole corpus as [UNK] and die in prepare_teacher).
    teacher = yaml.safe_load((tiny_pipeline.repo.path / "params.yaml").read_text())["teacher"]
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_bytes(
        (Path(teacher["source"]) / "config.json").read_bytes())
    return tiny_pipeline.clone(tiny_pipeline.repo.path, root / "repo")


@pytest.fixture
def bad_input_repo(_bad_input_repo):
    yield _bad_input_repo
    # A failed `dvc exp run` leaves its -S in params.yaml; put the committed state back.
    _bad_input_repo.run("git", "checkout", "-q", "--", ".")
    _bad_input_repo.run("dvc", "checkout", "--force", "-q", "dvc.yaml")  # causal never ran here


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        # refused by DVC itself: -S cannot add keys
        pytest.param("train.lrr=1", "train.lrr", marks=pytest.mark.long),
        # past the teacher's 2 layers
        pytest.param("loss.schemes.multi.layer_map=[1,9]", "layer_map", marks=pytest.mark.long),
        # One of each kind the gate reads besides params (every kind: tests/test_refused_inputs.py)
        ("teacher.source={root}/config-only", "teacher.source"),
        ("corpus.text_path={root}/no-such-corpus.txt", "corpus.text_path"),
    ],
)
def test_bad_override_fails_before_any_work(bad_input_repo, override, key) -> None:
    """DVC deletes a stage's outputs just before it runs it: a bad input must be refused by
    check_params, with one paragraph and no traceback, and every output left as it was."""
    repo = bad_input_repo
    override = override.format(root=repo.path.parent)

    def outputs() -> dict:
        # Every output DVC could have deleted: check_params runs first, so none may change.
        return {
            p.relative_to(repo.path): p.read_bytes()
            for p in sorted((repo.path / "data").rglob("*"))
            # params.ok is the failed check's own marker, which DVC clears before checking.
            if p.is_file() and "checkpoints" not in p.parts and p.name != "params.ok"
        }

    before = outputs()

    rc, stdout, stderr = _run(repo, "dvc", "exp", "run", "-S", override)
    out = stdout + stderr
    assert rc != 0, out
    assert key in stderr, out
    assert "Traceback" not in out, out
    assert "distil:" not in out, out  # not a single training step
    assert not list((repo.path / "data" / "checkpoints").rglob("checkpoint.pt"))
    assert outputs() == before, out


def test_unreachable_tracking_server_warns_keeps_the_points_and_writes_outputs(tiny_pipeline,
                                                                              tmp_path) -> None:
    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    metrics = repo.path / "data" / "train" / "logit.json"
    plot = repo.path / "data" / "train" / "logit.csv"
    before = read_json(metrics)
    stamps = (metrics.stat().st_mtime_ns, plot.stat().st_mtime_ns)
    env = {
        **repo.env,
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }

    rc, stdout, stderr = _run(
        repo, "dvc", "repro", "--single-item", "--force", "train@logit", env=env
    )
    assert rc == 0, stdout + stderr
    assert _ran(stdout) == {"train@logit"}, stdout
    warnings = [line for line in stderr.splitlines() if "warning" in line.lower()]
    # One line when MLflow first fails, one at the stage's end with what it kept and how to send it.
    assert len(warnings) == 2 and "MLflow" in warnings[0], stderr
    assert "http://127.0.0.1:9" in warnings[0]
    [pending] = list((repo.path / "mlflow-pending").glob("*train-logit*.json"))
    assert "python -m kd.core.tracking replay" in warnings[1] and str(pending) in warnings[1]
    assert re.search(r"(\d+) of its \1 metric points", warnings[1]), warnings[1]
    assert metrics.stat().st_mtime_ns > stamps[0] and plot.stat().st_mtime_ns > stamps[1]
    assert read_json(metrics) == before  # no wall time in it: the same bytes again


@pytest.mark.long
def test_killed_training_resumes_to_the_same_result(tiny_pipeline, tmp_path) -> None:
    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    # Long enough that a kill 0.5-2 s after the first checkpoint lands mid-run: a tiny step takes
    # ~20-30 ms on one busy core, so the run has seconds left at the kill.
    _set_params(
        repo.path / "params.yaml",
        train={"max_steps": RESUME_STEPS, "checkpoint_every": 5, "log_every": 20,
               "attribution_every": 40},
    )
    cmd = [sys.executable, "-m", "kd.training.launch", "stages.train", "--arm", "multi"]
    metrics = repo.path / "data" / "train" / "multi.json"
    ckpt = repo.path / "data" / "checkpoints" / "multi" / "checkpoint.pt"

    whole = subprocess.run(cmd, cwd=repo.path, env=repo.env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    expected, expected_weights = read_json(metrics), _weights(repo, "multi")
    assert expected["steps"] == RESUME_STEPS and not ckpt.exists()

    log = tmp_path / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=repo.path,
            env=repo.env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not ckpt.exists():
                assert proc.poll() is None, (
                    f"exited before its first checkpoint:\n{log.read_text()}"
                )
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            time.sleep(random.uniform(0.5, 2.0))
            assert proc.poll() is None, "training finished before the kill: raise max_steps"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists()

    resumed = subprocess.run(cmd, cwd=repo.path, env=repo.env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    step = re.search(r"resuming from step (\d+)", resumed.stdout + resumed.stderr)
    assert step, resumed.stdout + resumed.stderr
    assert 0 < int(step.group(1)) < RESUME_STEPS and int(step.group(1)) % 5 == 0
    assert read_json(metrics) == expected
    assert _weights(repo, "multi") == expected_weights
    assert not ckpt.exists()


@pytest.mark.long
def test_fresh_copy_reproduces_the_lock_byte_for_byte(tiny_pipeline, twin) -> None:
    """`dvc repro` in a second fresh copy gives the same dvc.lock: every output DVC hashes, the
    models, the metrics, the report's figures, comes out bit for bit the same."""
    copy, proc = twin
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("the second repository's `dvc repro` did not finish in 900 s")
    log = (copy.path.parent / "repro.log").read_text()
    assert proc.returncode == 0, log
    repo = tiny_pipeline.repo
    for arm in ARMS:
        ours = read_json(repo.path / "data" / "train" / f"{arm}.json")
        theirs = read_json(copy.path / "data" / "train" / f"{arm}.json")
        assert ours == theirs, arm
        assert any(k.startswith("mean/grad_norm/") for k in ours)
        pd.testing.assert_frame_equal(
            _train_csv(repo, arm), _train_csv(copy, arm), check_exact=True
        )
        assert _weights(repo, arm) == _weights(copy, arm), arm
    ours, theirs = yaml.safe_load((repo.path / "dvc.lock").read_text()), yaml.safe_load(
        (copy.path / "dvc.lock").read_text())
    differ = [name for name in ours["stages"] if ours["stages"][name] != theirs["stages"].get(name)]
    assert not differ, f"stages whose lock entry differs: {differ}"
    assert (repo.path / "dvc.lock").read_bytes() == (copy.path / "dvc.lock").read_bytes()
