"""Links into the MLflow UI that open straight on the comparison the study makes.

MLflow's UI opens on its GenAI view, and its compare page for two runs shows parameter plots, not
curves. Two of its pages can be opened by URL on what a distillation user wants instead:

- the experiment's runs in the **Model training** view (``workflowType=machine_learning``), where
  each pipeline execution is one parent row that expands into its stage runs;
- the **metric page** (``#/metric?...``), which overlays one or more metrics of several runs on one
  chart over steps, with a legend naming each run: the two arms' ``loss/logit``, or their
  per-layer gradient norms, as in the study's figures.

``python -m kd.report.mlflow_ui`` prints those links for the newest training run of each arm
(``--url`` the UI's address; ``MLFLOW_TRACKING_URI`` or ``mlflow.db`` says where to look).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from kd.core import tracking

DEFAULT_URL = "http://127.0.0.1:5000"
TRAINING_VIEW = "machine_learning"  # the UI's name for its Model training toggle


def _json(value) -> str:
    return urllib.parse.quote(json.dumps(value, separators=(",", ":")), safe="")


def runs_url(base: str, experiment_id: str, search: str | None = None) -> str:
    """The experiment's runs page in the Model training view, optionally filtered."""
    query = {"workflowType": TRAINING_VIEW}
    if search:
        query["searchFilter"] = search
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def metric_url(base: str, experiment_id: str, run_ids: list[str], keys: list[str]) -> str:
    """The metric page overlaying ``keys`` of ``run_ids`` over steps (the UI's "Plot chart").

    The page reads every one of these query fields and refuses the URL if one is missing (and
    ``runs`` must come first)."""
    query = {
        "runs": _json(run_ids),
        "metric": _json(keys[0]),
        "experiments": _json([experiment_id]),
        "plot_metric_keys": _json(keys),
        "plot_layout": _json({}),
        "x_axis": "step",
        "y_axis_scale": "linear",
        "line_smoothness": "1",
        "show_point": "false",
        "deselected_curves": _json([]),
        "last_linear_y_axis_range": _json([]),
        "workflowType": TRAINING_VIEW,
    }
    return f"{base.rstrip('/')}/#/metric?" + "&".join(f"{k}={v}" for k, v in query.items())


def newest_train_runs(client, experiment_id: str, stage: str = "train") -> dict[str, object]:
    """The newest finished ``<stage>@<arm>`` run of each arm, by arm (``train``, or
    ``causal_train`` for the causal family)."""
    found: dict[str, object] = {}
    runs = client.search_runs(
        [experiment_id],
        f"tags.`kd.stage` = '{stage}' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    for run in runs:
        found.setdefault(run.data.tags.get("kd.arm", run.info.run_name), run)
    return found


def grad_norm_keys_from(metrics) -> list[str]:
    """The per-layer gradient-norm keys among ``metrics``' keys, in layer order."""
    keys = [k for k in metrics if k.startswith("grad_norm/layer_")]
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def grad_norm_keys(client, run_id: str) -> list[str]:
    """The run's per-layer gradient-norm curves, in layer order."""
    return grad_norm_keys_from(client.get_run(run_id).data.metrics)


def links(client, base: str, stage: str = "train") -> dict[str, str]:
    """The training view, and the arms' logit-loss and gradient-norm curves overlaid (the
    arms of ``stage``: ``train``, or ``causal_train``)."""
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        return {}
    out = {
        "runs (one row per dvc repro / dvc exp run)": runs_url(base, exp.experiment_id),
        "training runs only": runs_url(base, exp.experiment_id, f"tags.`kd.stage` = '{stage}'"),
    }
    arms = newest_train_runs(client, exp.experiment_id, stage)
    if len(arms) >= 2:
        ids = [run.info.run_id for _, run in sorted(arms.items())]
        out["loss/logit, arms overlaid"] = metric_url(base, exp.experiment_id, ids, ["loss/logit"])
        grads = grad_norm_keys(client, ids[0])
        if grads:
            out["grad_norm/layer_*, arms overlaid"] = metric_url(
                base, exp.experiment_id, ids, grads
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kd.report.mlflow_ui", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--url", default=DEFAULT_URL, help=f"the MLflow UI's address ({DEFAULT_URL})")
    ap.add_argument("--family", choices=("mlm", "causal"), default="mlm",
                    help="whose arms: the MLM family's train@<arm> runs, or causal_train@<arm>")
    args = ap.parse_args(argv)
    import mlflow

    stage = "train" if args.family == "mlm" else "causal_train"
    found = links(mlflow.MlflowClient(tracking_uri=tracking.tracking_uri()), args.url, stage)
    if not found:
        print(
            f"no '{tracking.EXPERIMENT}' experiment in {tracking.tracking_uri()}: run `dvc repro` first",
            file=sys.stderr,
        )
        return 1
    for what, url in found.items():
        print(f"{what}:\n  {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
