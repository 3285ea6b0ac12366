"""What a person sees in MLflow after `dvc repro` and one `dvc exp run`, through a real server.

The tiny pipeline's clone after `dvc exp run -S loss.scheme=logit` (conftest.py's
``tiny_experiment``) is served by ``mlflow server`` on 127.0.0.1. Its REST API is read with the
standard library only, as any other client would; the UI is loaded in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from ui_browser import browser_missing, chart_legend, curves_drawn, expand_parents, page, ui_base
from ui_browser import server as mlflow_server

from kd.core.tracking import EXPERIMENT, PIPELINE_RUNS, STAGE_RUNS
from kd.report import mlflow_ui, registry

pytestmark = [pytest.mark.slow, pytest.mark.long]

STEPS = [2, 4, 6]  # train.max_steps=6, train.log_every=2
BATCHES = [0, 1]  # evaluate.test_batches = evaluate.train_batches = 2
INTERMEDIATE = ("loss/hidden", "loss/attention", "loss/embedding")
# The stage runs of the tiny `dvc repro` that the comparison needs (dvc.yaml has more).
CORE = {"train@logit", "train@multi", "evaluate@logit", "evaluate@multi", "report"}
# Set to a folder to keep the browser's pictures there (docs/mlflow.md's runs-page picture).
SHOTS_ENV = "KD_UI_SHOTS"


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

    def experiment_id(self) -> str:
        return self.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"][
            "experiment_id"
        ]

    def search(self, filter_string: str) -> list[dict]:
        body = {"experiment_ids": [self.experiment_id()], "filter": filter_string,
                "max_results": 1000}  # fmt: skip
        return [_flat(r) for r in self.post("runs/search", body).get("runs", [])]


def _flat(run: dict) -> dict:
    """A run as ``info`` fields plus ``tags`` and ``metrics`` (latest values) by key."""
    data = run.get("data", {})
    return {
        **run["info"],
        "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
        "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
    }


@pytest.fixture(scope="module")
def api(tiny_experiment, tmp_path_factory):
    db = tiny_experiment.repo.path / "mlflow.db"
    with mlflow_server(db, tmp_path_factory.mktemp("mlflow_server")) as base:
        yield Api(base)


@pytest.fixture(scope="module")
def parents(api) -> dict[str, dict]:
    """The two executions' parent runs: ``workspace`` (the `dvc repro`) and ``experiment``."""
    found = api.search(PIPELINE_RUNS)
    assert len(found) == 2, [r["run_name"] for r in found]
    by = {"workspace" if r["tags"]["kd.dvc_exp"] == "workspace" else "experiment": r for r in found}
    assert set(by) == {"workspace", "experiment"}, by
    return by


@pytest.fixture(scope="module")
def children(api, parents) -> dict[str, dict[str, dict]]:
    """Each execution's stage runs, by run name."""
    out = {}
    for which, parent in parents.items():
        runs = api.search(f"{STAGE_RUNS} AND tags.`mlflow.parentRunId` = '{parent['run_id']}'")
        names = [r["run_name"] for r in runs]
        assert len(names) == len(set(names)), f"a stage ran twice in one execution: {names}"
        out[which] = {r["run_name"]: r for r in runs}
    return out


def test_experiment_opens_on_training_runs(api) -> None:
    exp = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags.get("mlflow.experimentKind") == "custom_model_development"


def test_each_execution_is_one_parent_holding_its_stage_runs(api, parents, children) -> None:
    for which, parent in parents.items():
        tags = parent["tags"]
        assert parent["run_name"] == tags["kd.group"], which
        assert parent["status"] == "FINISHED", which
        assert len(tags["mlflow.source.git.commit"]) == 40 and tags["kd.params_sha256"], which
        assert {r["tags"]["kd.group"] for r in children[which].values()} == {tags["kd.group"]}
    assert parents["experiment"]["run_name"] == parents["experiment"]["tags"]["kd.dvc_exp"]
    # The `dvc repro` ran every stage; the experiment reran the report, never a training.
    assert CORE <= set(children["workspace"]), sorted(children["workspace"])
    assert "report" in children["experiment"]
    assert not any(n.startswith(("train@", "evaluate@")) for n in children["experiment"])
    # No stage run outside a parent.
    every = api.search(STAGE_RUNS)
    ids = {parents[w]["run_id"] for w in parents}
    assert {r["tags"].get("mlflow.parentRunId") for r in every} == ids
    assert len(every) == sum(len(c) for c in children.values())


def test_the_arms_share_metric_keys_with_one_point_per_logged_step(api, children) -> None:
    logit, multi = (children["workspace"][f"train@{arm}"] for arm in ("logit", "multi"))
    assert (logit["tags"]["kd.arm"], multi["tags"]["kd.arm"]) == ("logit", "multi")
    # The multi arm has its intermediate terms (and their attributions) besides; every other key
    # is shared, so the compare view overlays it.
    extra = set(multi["metrics"]) - set(logit["metrics"])
    assert set(INTERMEDIATE) <= extra, sorted(extra)
    assert not set(logit["metrics"]) - set(multi["metrics"])
    curves = [k for k in logit["metrics"] if k.startswith(("loss/", "grad_norm/"))]
    curves += ["lr", "tokens"]
    assert {"loss/logit", "loss/total", "grad_norm/global", "grad_norm/layer_0"} <= set(curves)
    for key in curves + list(INTERMEDIATE):
        for run in (logit, multi) if key in logit["metrics"] else (multi,):
            points = api.history(run["run_id"], key)
            assert sorted(p["step"] for p in points) == STEPS, (run["run_name"], key, points)
            assert all(isinstance(p["value"], float) for p in points)


def test_evaluate_runs_log_per_batch_curves(api, children) -> None:
    for arm in ("logit", "multi"):
        run = children["workspace"][f"evaluate@{arm}"]
        for key in ("test/logit_kl_t1", "train/logit_kl_t1"):
            points = api.history(run["run_id"], key)
            assert sorted(p["step"] for p in points) == BATCHES, (arm, key, points)


def test_registry_has_one_version_per_execution_and_it_loads(api, parents, tiny_experiment):
    body = {"filter": f"name = '{registry.NAME}'", "max_results": 100}
    versions = api.get("model-versions/search", **body).get("model_versions", [])
    assert len(versions) == 2, versions
    tags = {v["version"]: {t["key"]: t["value"] for t in v.get("tags", [])} for v in versions}
    by_group = {t["kd.group"]: version for version, t in tags.items()}
    assert set(by_group) == {p["tags"]["kd.group"] for p in parents.values()}
    for t in tags.values():
        assert t["kd.scheme"] in ("logit", "multi") and len(t["mlflow.source.git.commit"]) == 40
        assert float(t["metric.test/logit_kl_t1"]) > 0, t
    ours = by_group[parents["experiment"]["tags"]["kd.group"]]
    assert tags[ours]["kd.scheme"] == "logit"
    assert tags[ours]["kd.dvc_exp"] == parents["experiment"]["tags"]["kd.dvc_exp"]
    head = tiny_experiment.repo.path / "data" / "metrics" / "eval.json"
    assert float(tags[ours]["metric.test/logit_kl_t1"]) == pytest.approx(
        json.loads(head.read_text())["test/logit_kl_t1"], abs=1e-4
    )
    alias = api.get("registered-models/alias", name=registry.NAME, alias=registry.ALIAS)
    assert alias["model_version"]["version"] == ours

    import mlflow

    mlflow.set_tracking_uri(api.base)
    try:
        fill = mlflow.transformers.load_model(f"models:/{registry.NAME}@{registry.ALIAS}")
    finally:
        mlflow.set_tracking_uri(None)
    guesses = fill(registry.EXAMPLE[0])
    assert len(guesses) == 5 and all(isinstance(g["token_str"], str) for g in guesses)


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_ui_overlays_the_arms_and_groups_the_runs(api, parents, children, tmp_path) -> None:
    # The UI is a JavaScript app: only a browser that runs it shows whether the page works.
    base, exp_id = ui_base(api.base), api.experiment_id()
    arms = [children["workspace"][f"train@{arm}"] for arm in ("logit", "multi")]
    ids = [run["run_id"] for run in arms]
    shots = Path(os.environ.get(SHOTS_ENV) or tmp_path)
    with page() as pg:
        # The chart itself, not only the page, names both arms: one curve and one legend entry
        # per run.
        url = mlflow_ui.metric_url(base, exp_id, ids, ["loss/logit"])
        legend = chart_legend(pg, url, ["train@logit (loss/logit)", "train@multi (loss/logit)"])
        assert sorted(legend) == ["train@logit (loss/logit)", "train@multi (loss/logit)"], legend
        assert curves_drawn(pg) == 2
        pg.screenshot(path=tmp_path / "loss-logit.png")

        grads = mlflow_ui.grad_norm_keys_from(arms[0]["metrics"])
        url = mlflow_ui.metric_url(base, exp_id, ids, grads)
        legend = chart_legend(pg, url, [f"train@{a} ({grads[-1]})" for a in ("logit", "multi")])
        assert len(legend) == curves_drawn(pg) == 2 * len(grads), (legend, curves_drawn(pg))

        # The Experiments page in the training view: one row per execution, expanding into its
        # stage runs.
        names = [parents[w]["run_name"] for w in ("workspace", "experiment")]
        expand_parents(pg, mlflow_ui.runs_url(base, exp_id), names)
        # A run-name cell reads "<colour>\n<name>"; the table holds what is expanded.
        cells = [
            t.strip().split("\n")[-1] for t in pg.locator('[role="gridcell"]').all_inner_texts()
        ]
        for stage in ("train@logit", "train@multi", "evaluate@multi", *names):
            assert stage in cells, (stage, cells)
        assert cells.count("report") == 2, cells  # one per execution
        pg.screenshot(path=shots / "mlflow-runs.png")
    assert (shots / "mlflow-runs.png").stat().st_size > 10_000
    if shots != tmp_path:
        shutil.copy(tmp_path / "loss-logit.png", shots / "mlflow-loss-logit-tiny.png")
