"""The runs of a whole `dvc repro`, read back through a real `mlflow server`'s REST API.

The server serves the tracking database of the session's tiny pipeline (conftest.py); only the
standard library talks to it, as any other client would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from kd.core.tracking import EXPERIMENT, PIPELINE_RUNS, STAGE_RUNS

pytestmark = pytest.mark.slow

STEPS = [2, 4, 6]  # train.max_steps=6, train.log_every=2
INTERMEDIATE = ("loss/hidden", "loss/attention", "loss/embedding")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **query) -> dict:
        url = f"{self.base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.base}/api/2.0/mlflow/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def history(self, run_id: str, key: str) -> list[dict]:
        return self.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])


@pytest.fixture(scope="module")
def api(tiny_pipeline, tmp_path_factory):
    cwd = tmp_path_factory.mktemp(
        "mlflow_server"
    )  # the server's default artifact folder lands here
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = (cwd / "server.log").open("w")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tiny_pipeline.repo.path / 'mlflow.db'}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # Its own session: the server starts worker processes, and they all go down together.
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = Api(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.get("experiments/get-by-name", experiment_name=EXPERIMENT)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"mlflow server did not answer:\n{(cwd / 'server.log').read_text()}"
                    )
                time.sleep(0.5)
        yield client
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _search(api, filter_string: str) -> list[dict]:
    exp = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    body = {"experiment_ids": [exp["experiment_id"]], "filter": filter_string, "max_results": 1000}
    return api.post("runs/search", body).get("runs", [])


@pytest.fixture(scope="module")
def runs(api) -> dict[str, dict]:
    """The stage runs, by name."""
    out = {}
    for run in _search(api, STAGE_RUNS):
        name = run["info"]["run_name"]
        assert name not in out, f"two runs named {name}: the pipeline ran once"
        out[name] = {**run["info"], "tags": {t["key"]: t["value"] for t in run["data"]["tags"]}}
    return out


def test_experiment_opens_on_training_runs(api) -> None:
    exp = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags.get("mlflow.experimentKind") == "custom_model_development"


def test_one_parent_run_holds_every_stage_run(api, runs) -> None:
    """One `dvc repro`, one parent run in the Experiments page; each stage's run nested in it."""
    (parent,) = _search(api, PIPELINE_RUNS)
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert parent["info"]["run_name"] == tags["kd.group"] == runs["train@logit"]["tags"]["kd.group"]
    assert parent["info"]["status"] == "FINISHED"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["kd.params_sha256"]
    assert {r["tags"]["mlflow.parentRunId"] for r in runs.values()} == {parent["info"]["run_id"]}


def test_both_arms_are_runs_of_one_group(runs) -> None:
    assert {"train@logit", "train@multi"} <= set(runs)
    logit, multi = runs["train@logit"], runs["train@multi"]
    assert logit["tags"]["kd.stage"] == multi["tags"]["kd.stage"] == "train"
    assert (logit["tags"]["kd.arm"], multi["tags"]["kd.arm"]) == ("logit", "multi")
    assert logit["tags"]["kd.group"] == multi["tags"]["kd.group"]
    # One `dvc repro`, one group: every stage's run carries the same key.
    assert {r["tags"]["kd.group"] for r in runs.values()} == {logit["tags"]["kd.group"]}
    assert {r["status"] for r in runs.values()} == {"FINISHED"}


@pytest.mark.parametrize("arm", ["logit", "multi"])
@pytest.mark.parametrize(
    "key", ["loss/total", "loss/logit", "grad_norm/layer_0", "grad_norm/global"]
)
def test_curves_have_one_point_per_logged_step(api, runs, arm, key) -> None:
    points = api.history(runs[f"train@{arm}"]["run_id"], key)
    assert sorted(p["step"] for p in points) == STEPS, points
    assert all(isinstance(p["value"], float) for p in points)


def test_only_the_multi_arm_has_intermediate_terms(api, runs) -> None:
    for key in INTERMEDIATE:
        multi = api.history(runs["train@multi"]["run_id"], key)
        assert sorted(p["step"] for p in multi) == STEPS, (key, multi)
        assert api.history(runs["train@logit"]["run_id"], key) == [], key


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_ui_compares_the_two_arms_in_a_real_browser(api, runs, tmp_path) -> None:
    # The UI is a JavaScript app: only a browser that runs it shows whether the page works.
    ids = json.dumps([runs["train@logit"]["run_id"], runs["train@multi"]["run_id"]])
    exp = json.dumps([runs["train@logit"]["experiment_id"]])
    url = f"{api.base}/#/compare-runs?runs={ids}&experiments={exp}"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1100",
        "--virtual-time-budget=20000", "--dump-dom", url,
    ]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "Comparing 2 Runs" in dom, dom[-2000:]
    assert "train@logit" in dom and "train@multi" in dom
