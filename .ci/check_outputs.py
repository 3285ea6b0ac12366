"""After the smoke pipeline: every declared metric exists and is finite, the report and the
distilled model are there, and MLflow holds a run for every stage with its metric histories."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml


def numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(obj, bool):
        return
    elif isinstance(obj, int | float) or obj is None:
        yield path, obj


def main() -> None:
    problems = []
    shown = json.loads(subprocess.run(["dvc", "metrics", "show", "--json"], check=True,
                                      capture_output=True, text=True).stdout)
    files = shown.get("", shown.get("workspace", {})).get("data", {})
    if not files:
        problems.append("dvc metrics show found no metrics")
    count = 0
    for name, content in files.items():
        if "error" in content:
            problems.append(f"{name}: {content['error']}")
            continue
        for key, value in numbers(content.get("data", {})):
            count += 1
            if value is None or not math.isfinite(value):
                problems.append(f"{name}: {key} = {value}")
    p = yaml.safe_load(Path("params.yaml").read_text())
    report, distilled = Path(p["paths"]["report"]), Path(p["paths"]["distilled"])
    for needed in [report / "report.md", distilled / "config.json", distilled / "tokenizer.json"]:
        if not needed.exists():
            problems.append(f"missing {needed}")
    if not list(report.glob("*.png")):
        problems.append(f"no figures in {report}")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("kd-pipeline")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    names = {r.info.run_name for r in runs}
    for arm in p["loss"]["arms"]:
        for stage in ("train", "evaluate"):
            if f"{stage}@{arm}" not in names:
                problems.append(f"no MLflow run {stage}@{arm} (have {sorted(names)})")
    # The causal pipeline ran second (.ci/smoke).
    causal = Path(p["paths"]["causal"])
    if not (causal / "report" / "report.md").exists():
        problems.append(f"missing {causal / 'report' / 'report.md'}")
    for arm in p["causal"]["arms"]:
        for stage in ("causal_train", "causal_evaluate"):
            if f"{stage}@{arm}" not in names:
                problems.append(f"no MLflow run {stage}@{arm}")
    if "kl_t1" not in json.dumps(files):
        problems.append("data/metrics/causal.json holds no causal scores")
    for r in runs:
        if r.info.run_name.startswith(("train@", "causal_train@")):
            hist = client.get_metric_history(r.info.run_id, "loss/total")
            if len(hist) < 2:
                problems.append(f"{r.info.run_name}: loss/total has {len(hist)} points")
    if problems:
        sys.exit("smoke outputs are not right:\n  " + "\n  ".join(problems))
    print(f"smoke outputs ok: {count} finite metric values, {len(runs)} MLflow runs")


if __name__ == "__main__":
    main()
