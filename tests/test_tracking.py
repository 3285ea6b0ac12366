from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.core import tracking


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def _runs(client: MlflowClient):
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert exp is not None
    return client.search_runs([exp.experiment_id], tracking.STAGE_RUNS)


# --- where runs go -------------------------------------------------------------------------------


def test_tracking_uri_honours_env(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    monkeypatch.setenv("DVC_ROOT", "/somewhere/else")
    assert tracking.tracking_uri() == "http://tracking.example:5000"


def test_tracking_uri_defaults_to_dvc_root(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


@pytest.mark.parametrize(
    "inside", [".dvc/tmp/exps/tmpab12cd", ".dvc/tmp/exps/standalone/tmpxyz/sub"]
)
def test_tracking_uri_escapes_dvc_exec_dirs(monkeypatch, tmp_path, inside) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / inside))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_tracking_uri_outside_dvc_and_git_is_cwd(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# --- tags ----------------------------------------------------------------------------------------


def test_start_run_tags_params_and_metrics(monkeypatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-otter")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    with tracking.start_run(
        "train", params={"train": {"lr": 0.1}}, arm="logit", tags={"extra": 3}
    ) as run:
        assert run.active
        run.log_metrics({"loss": 1.5, "skipped": None}, step=2)
        run.set_tags({"late": "yes"})
    client = _client()
    got = client.get_run(run.run_id)
    tags = got.data.tags
    assert tags["kd.stage"] == "train"
    assert tags["kd.arm"] == "logit"
    assert tags["kd.group"] == "brisk-otter"
    assert tags["kd.dvc_exp"] == "brisk-otter"
    assert tags["mlflow.source.git.commit"] == "a" * 40
    assert tags["extra"] == "3" and tags["late"] == "yes"
    assert got.info.run_name == "train@logit"
    assert got.info.status == "FINISHED"
    assert got.data.params == {"train.lr": "0.1"}
    assert got.data.metrics == {"loss": 1.5}
    [point] = client.get_metric_history(run.run_id, "loss")
    assert point.step == 2
    exp = client.get_experiment(got.info.experiment_id)
    assert exp.name == tracking.EXPERIMENT
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_second_run_reuses_the_experiment() -> None:
    with tracking.start_run("sample_corpus") as a:
        pass
    with tracking.start_run("tokenize") as b:
        pass
    runs = _runs(_client())
    assert {r.info.run_id for r in runs} == {a.run_id, b.run_id}
    assert all("kd.arm" not in r.data.tags for r in runs)
    # No experiment name: the workspace's group key, the same for both stages.
    assert len({r.data.tags["kd.group"] for r in runs}) == 1
    assert runs[0].data.tags["kd.dvc_exp"] == "workspace"


def test_stage_runs_nest_under_one_parent_per_pipeline_execution(monkeypatch) -> None:
    """One parent per group key (a `dvc repro` or a `dvc exp run`), named after it and tagged
    with the revision and params hash; a stage rerun alone finds it again; its status follows
    the latest stage."""
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-otter")
    with tracking.start_run("train", arm="logit") as a:
        pass
    with tracking.start_run("train", arm="multi") as b:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "calm-heron")
    with pytest.raises(RuntimeError), tracking.start_run("train", arm="logit") as c:
        raise RuntimeError("boom")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-otter")
    with tracking.start_run("report") as d:  # a stage rerun alone, later
        pass

    client = _client()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    parents = {
        r.info.run_name: r for r in client.search_runs([exp.experiment_id], tracking.PIPELINE_RUNS)
    }
    assert set(parents) == {"brisk-otter", "calm-heron"}
    otter = parents["brisk-otter"]
    assert otter.data.tags["mlflow.source.git.commit"] == "b" * 40
    assert otter.data.tags["kd.params_sha256"] == tracking.params_hash()
    assert otter.info.status == "FINISHED" and parents["calm-heron"].info.status == "FAILED"
    nested = {r.info.run_id: r.data.tags["mlflow.parentRunId"] for r in _runs(client)}
    assert nested == {
        a.run_id: otter.info.run_id,
        b.run_id: otter.info.run_id,
        d.run_id: otter.info.run_id,
        c.run_id: parents["calm-heron"].info.run_id,
    }


def test_failed_body_marks_the_run_failed() -> None:
    with pytest.raises(RuntimeError), tracking.start_run("train", arm="multi") as run:
        raise RuntimeError("boom")
    assert _client().get_run(run.run_id).info.status == "FAILED"


def test_group_key(monkeypatch, tmp_path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("x: 1\n")
    b.write_text("x: 2\n")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    assert tracking.group_key(a) == tracking.group_key(a)
    assert tracking.group_key(a) != tracking.group_key(b)
    assert tracking.group_key(a).startswith("workspace-01234567-")
    monkeypatch.setenv("DVC_EXP_NAME", "named")
    assert tracking.group_key(a) == "named"


def test_flatten() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {
        "a.b": 1,
        "a.c.d": 2,
        "e": 3,
    }


# --- nothing lost when the backend fails ---------------------------------------------------------


@pytest.fixture
def pending(monkeypatch, tmp_path) -> Path:
    """Where undelivered records are kept (the repository root's mlflow-pending/), with no wait
    for the backend at a stage's end and a retry at every call."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv(tracking.FINAL_WAIT_ENV, "0")
    monkeypatch.setenv(tracking.RETRY_ENV, "0")
    return tmp_path / tracking.PENDING_DIR


def test_disabled_run_is_a_no_op(capsys) -> None:
    with tracking.start_run("train", enabled=False) as run:
        assert not run.active
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_params({"a": 1})
    assert capsys.readouterr().err == ""


class _Switch:
    """An ``MlflowClient`` on the test's database that fails every call while ``down``."""

    def __init__(self):
        self.down = False
        self.failed = 0

    def __call__(self, uri):
        real = MlflowClient(tracking_uri=uri)
        switch = self

        class Client:
            def __getattr__(self, name):
                method = getattr(real, name)

                def call(*args, **kwargs):
                    if switch.down:
                        switch.failed += 1
                        raise ConnectionError(f"{name}: connection refused")
                    return method(*args, **kwargs)

                return call

        return Client()


def _history(run_id: str, key: str) -> list[tuple[int, int, float]]:
    return sorted((m.step, m.timestamp, m.value) for m in _client().get_metric_history(run_id, key))


def test_down_at_start_then_back_delivers_every_point_with_its_step_and_time(pending, capsys):
    switch = _Switch()
    switch.down = True
    run = tracking.Run(tracking.stage_spec("train", "logit"), client=switch, fluent=False)
    run.log_params({"lr": 0.1})
    for step in (2, 4):
        run.log_metrics({"loss": step / 10, "grad/l0": step}, step=step)
    assert run.run_id is None and run.pending == 4
    queued = list(run._metrics)
    switch.down = False
    run.log_metrics({"loss": 0.6, "grad/l0": 6}, step=6)
    run.close("FINISHED")
    assert run.pending == 0 and run.undelivered == 0 and not pending.exists()
    got = _client().get_run(run.run_id)
    # Opened late with the stage's own start time, before its first point.
    assert got.info.start_time <= queued[0][2]
    assert got.info.status == "FINISHED" and got.data.params == {"lr": "0.1"}
    assert [s for s, _, _ in _history(run.run_id, "loss")] == [2, 4, 6]
    assert [(s, t) for s, t, _ in _history(run.run_id, "loss")][:2] == [
        (step, ms) for key, _, ms, step in queued if key == "loss"
    ]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "answers again" in err


def test_a_restart_mid_stage_loses_nothing(pending, capsys) -> None:
    switch = _Switch()
    run = tracking.Run(tracking.stage_spec("train", "multi"), client=switch, fluent=False)
    for step in range(1, 11):
        switch.down = step in (4, 5, 6, 9)  # two outages
        run.log_metrics({"loss": 1 / step, "lr": 0.01}, step=step)
    switch.down = False
    run.close("FINISHED")
    assert switch.failed >= 4
    for key in ("loss", "lr"):
        assert [s for s, _, _ in _history(run.run_id, key)] == list(range(1, 11))
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and err.count("answers again") == 2


def test_retries_wait_between_tries(pending, monkeypatch) -> None:
    monkeypatch.setenv(tracking.RETRY_ENV, "3600")
    switch = _Switch()
    switch.down = True
    run = tracking.Run(tracking.stage_spec("train"), client=switch, fluent=False)
    for step in range(5):
        run.log_metrics({"loss": 1.0}, step=step)
    assert switch.failed == 1  # a down server costs one try per retry period, not one per call
    switch.down = False
    run.close("FINISHED")  # the end does not wait for the period
    assert len(_history(run.run_id, "loss")) == 5


def test_undelivered_is_kept_said_with_its_count_and_replayed(pending, monkeypatch, capsys):
    """A server down for the whole stage: the run, its params, tags, points and artifact are
    kept; the stage says how many points; `python -m kd.core.tracking replay` sends them into a
    run with the stage's tags, nested under its pipeline execution."""
    target = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-otter")
    artifact = pending.parent / "work" / "train.csv"
    artifact.parent.mkdir()
    artifact.write_text("step,loss\n1,2.0\n")
    with tracking.start_run("train", params={"lr": 1}, arm="logit", tags={"t": 1}) as run:
        assert run.active and run.run_id is None
        for step in (1, 2, 3):
            run.log_metrics({"loss": 1.0 / step}, step=step)
        run.log_artifact(artifact)
    err = capsys.readouterr().err
    assert err.count("warning:") == 2  # the failure, then the count
    assert "train@logit: 3 of its 3 metric points" in err and tracking.REPLAY in err
    [kept] = pending.glob("*.json")
    artifact.unlink()  # a queued experiment's copy is gone by the time of the replay

    assert tracking.main(["replay", "--tracking-uri", target]) == 0
    assert not list(pending.glob("*.json"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", target)
    [got] = _runs(_client())
    assert got.data.tags["kd.arm"] == "logit" and got.data.tags["kd.dvc_exp"] == "brisk-otter"
    assert got.data.tags["t"] == "1" and got.data.params == {"lr": "1"}
    assert got.info.status == "FINISHED"
    assert [s for s, _, _ in _history(got.info.run_id, "loss")] == [1, 2, 3]
    [parent] = _client().search_runs([got.info.experiment_id], tracking.PIPELINE_RUNS)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.run_name == "brisk-otter"
    [listed] = _client().list_artifacts(got.info.run_id)
    assert listed.path == "train.csv"


def test_a_replay_that_fails_keeps_the_rest_for_the_next(pending, capsys) -> None:
    switch = _Switch()
    switch.down = True
    run = tracking.Run(tracking.stage_spec("evaluate"), client=switch, fluent=False)
    run.log_metrics({"a": 1.0, "b": 2.0}, step=0)
    run.close("FINISHED")
    [kept] = pending.glob("*.json")
    assert tracking.replay([kept], uri="http://127.0.0.1:9") == 2
    assert kept.exists()
    assert tracking.replay([kept]) == 0 and not kept.exists()
    [got] = _runs(_client())
    assert got.data.metrics == {"a": 1.0, "b": 2.0}


def test_a_refusal_is_dropped_and_counted_not_queued_forever(pending, capsys) -> None:
    with tracking.start_run("train", params={"lr": 1}) as run:
        run.log_params({"lr": 2})  # MLflow params are immutable
        run.log_metrics({"loss": 1.0}, step=1)
    assert run.undelivered == 0
    err = capsys.readouterr().err
    assert "refused 1 params" in err
    assert _client().get_run(run.run_id).data.metrics == {"loss": 1.0}


def test_call_when_unreachable_says_so_and_returns_none(pending, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with tracking.start_run("report") as run:
        assert run.call(lambda mlflow: 1) is None
    assert "was not done" in capsys.readouterr().err


# --- inside real DVC experiments -----------------------------------------------------------------

_STAGE_SCRIPT = """\
import json

import yaml

from kd.core import tracking

lr = yaml.safe_load(open("params.yaml"))["lr"]
with tracking.start_run("track", params={"lr": lr}, arm="logit") as run:
    run.log_metrics({"score": lr * 2}, step=0)
assert run.active, "tracking failed"
json.dump({"score": lr * 2}, open("metric.json", "w"))
"""

_DVC_YAML = """\
stages:
  track:
    cmd: python track.py
    deps:
      - track.py
    params:
      - lr
    metrics:
      - metric.json:
          cache: false
"""


@pytest.mark.slow
@pytest.mark.long
def test_dvc_experiments_track_into_the_parent_repo(git_dvc_repo) -> None:
    repo = git_dvc_repo
    (repo.path / "params.yaml").write_text("lr: 0.1\n")
    (repo.path / "dvc.yaml").write_text(_DVC_YAML)
    (repo.path / "track.py").write_text(_STAGE_SCRIPT)
    head = repo.commit("init")

    # --temp: runs in <repo>/.dvc/tmp/exps/standalone/tmp*, a copy deleted afterwards.
    out = repo.run("dvc", "exp", "run", "--temp", "-S", "lr=0.5", "-n", "temp-exp")
    assert "Ran experiment(s): temp-exp" in out

    repo.run("dvc", "exp", "run", "--queue", "-S", "lr=0.7", "-n", "queued-exp")
    status = repo.run_queue(deadline_s=240)
    assert "Success" in status, status

    db = repo.path / "mlflow.db"
    assert db.exists()
    assert not list((repo.path / ".dvc").rglob("mlflow.db"))  # nothing in the executors' copies
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = {r.data.tags["kd.dvc_exp"]: r for r in _runs(client)}
    assert set(runs) == {"temp-exp", "queued-exp"}
    for name, lr in (("temp-exp", 0.5), ("queued-exp", 0.7)):
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["kd.group"] == name
        assert run.data.tags["kd.stage"] == "track"
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert run.data.params["lr"] == str(lr)
        assert run.data.metrics["score"] == pytest.approx(2 * lr)
    shown = repo.run("dvc", "exp", "show", "--csv")
    assert "temp-exp" in shown and "queued-exp" in shown


def _system_metrics(run_id: str) -> list[str]:
    metrics = _client().get_run(run_id).data.metrics
    return [k for k in metrics if k.startswith("system/cpu_utilization")]


def test_datasets_are_logged_as_run_inputs_and_long_stages_sample_the_system(monkeypatch):
    import time

    import pandas as pd
    from datasets import Dataset

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    docs = pd.DataFrame({"id": ["a", "b"], "text": ["one doc", "another doc"]})
    blocks = Dataset.from_dict({"input_ids": [[101, 7, 102], [101, 8, 102]]})
    with tracking.start_run("train", arm="logit", system_metrics=True) as run:
        run.log_dataset(docs, "corpus/train", "data/corpus/train.jsonl", "training")
        run.log_dataset(blocks, "tokens/train", "data/tokens/train", "training")
        # The monitor samples every second, on its own thread: wait for its first logged sample
        # (a deadline, not a fixed sleep that a loaded machine can outlast).
        deadline = time.monotonic() + 60
        while not _system_metrics(run.run_id):
            assert time.monotonic() < deadline, "no system metrics logged within 60 s"
            time.sleep(0.1)
    got = _client().get_run(run.run_id)
    inputs = {d.dataset.name: d for d in got.inputs.dataset_inputs}
    assert set(inputs) == {"corpus/train", "tokens/train"}
    assert [t.value for t in inputs["corpus/train"].tags] == ["training"]
    assert inputs["tokens/train"].dataset.digest
    assert _system_metrics(run.run_id), got.data.metrics
