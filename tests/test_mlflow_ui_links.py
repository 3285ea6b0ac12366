"""`python -m kd.report.mlflow_ui`: links that open the MLflow UI on the arms' comparison."""

from __future__ import annotations

import json
import urllib.parse

from kd.core import tracking
from kd.report import mlflow_ui


def _query(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(url.split("?", 1)[1]))


def test_links_open_the_training_view_on_the_newest_run_of_each_arm(monkeypatch, capsys) -> None:
    ids = {}
    for group in ("older", "newer"):
        monkeypatch.setenv("DVC_EXP_NAME", group)
        for arm in ("logit", "multi"):
            with tracking.start_run("train", arm=arm) as run:
                curves = {"loss/logit": 1.0, "grad_norm/layer_0": 0.1, "grad_norm/layer_10": 0.2,
                          "grad_norm/layer_2": 0.3}  # fmt: skip
                run.log_metrics(curves, step=1)
            ids[group, arm] = run.run_id

    assert mlflow_ui.main(["--url", "http://ui.example:8080"]) == 0
    urls = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    runs, train_only, loss, grads = urls
    assert runs.startswith("http://ui.example:8080/#/experiments/")
    assert _query(runs) == {"workflowType": "machine_learning"}
    assert _query(train_only)["searchFilter"] == "tags.`kd.stage` = 'train'"
    for url, keys in ((loss, ["loss/logit"]),
                      (grads, ["grad_norm/layer_0", "grad_norm/layer_2", "grad_norm/layer_10"])):  # fmt: skip
        assert url.startswith("http://ui.example:8080/#/metric?runs=")  # the page wants runs first
        q = _query(url)
        assert json.loads(q["runs"]) == [ids["newer", "logit"], ids["newer", "multi"]]
        assert json.loads(q["plot_metric_keys"]) == keys and json.loads(q["metric"]) == keys[0]
        assert q["workflowType"] == "machine_learning"


def test_links_without_runs_say_what_to_run(capsys) -> None:
    assert mlflow_ui.main([]) == 1
    assert "dvc repro" in capsys.readouterr().err


def test_links_for_the_causal_family_overlay_its_own_arms(capsys) -> None:
    ids = {}
    for stage in ("train", "causal_train"):
        for arm in ("logit", "multi"):
            with tracking.start_run(stage, arm=arm) as run:
                run.log_metrics({"loss/logit": 1.0, "grad_norm/layer_0": 0.1}, step=1)
            ids[stage, arm] = run.run_id
    assert mlflow_ui.main(["--family", "causal"]) == 0
    urls = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    _, train_only, loss, _ = urls
    assert _query(train_only)["searchFilter"] == "tags.`kd.stage` = 'causal_train'"
    assert json.loads(_query(loss)["runs"]) == [ids["causal_train", "logit"],
                                                ids["causal_train", "multi"]]
