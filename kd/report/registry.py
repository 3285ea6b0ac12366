"""The distilled student where an MLflow user looks for a model: the model registry.

The report stage logs the exported student (``data/distilled``) with MLflow's transformers
flavour, as a fill-mask pipeline with its tokenizer and a signature inferred from an example, and
registers it under one name, :data:`NAME`: one version per pipeline execution (a second report
run in the same ``dvc repro`` / ``dvc exp run`` reuses its version), tagged with the scheme, the
headline metrics, the DVC experiment and the git revision. The alias :data:`ALIAS` follows the
newest version, so ``mlflow.transformers.load_model("models:/kd-student@newest")`` is the last
experiment's student.
"""

from __future__ import annotations

from pathlib import Path

from kd.core import tracking

NAME = "kd-student"
ALIAS = "newest"  # MLflow reserves "latest"
EXAMPLE = ["The capital of France is [MASK]."]
# Version tags: the experiment's identity and the headline numbers (data/metrics/eval.json).
METRIC_TAGS = ("test/logit_kl_t1", "test/mlm_top1", "test/agreement", "probe_linear_acc")


def _requirements() -> list[str]:
    # Given explicitly: MLflow's own inference imports torchvision, which this project lacks.
    from importlib import metadata

    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in ("torch", "transformers")]


def _register(mlflow, model_dir: Path, head: dict, tags: dict[str, str]) -> str:
    client = mlflow.MlflowClient()
    group = tags["kd.group"]
    mine = client.search_model_versions(f"name = '{NAME}' AND tag.`kd.group` = '{group}'")
    if mine:
        version = mine[0].version
    else:
        from transformers import pipeline

        fill = pipeline("fill-mask", model=str(model_dir))
        info = mlflow.transformers.log_model(
            fill, name="student", registered_model_name=NAME, input_example=EXAMPLE,
            pip_requirements=_requirements(),
        )
        version = str(info.registered_model_version)
        for key in METRIC_TAGS:
            if head.get(key) is not None:
                tags[f"metric.{key}"] = f"{head[key]:.4f}"
        for key, value in {"kd.scheme": head["scheme"], **tags}.items():
            client.set_model_version_tag(NAME, version, key, value)
    client.set_registered_model_alias(NAME, ALIAS, version)
    return version


def register(run: tracking.Run, model_dir: Path, head: dict) -> str | None:
    """Log and register ``model_dir`` in ``run``; the version, or None when tracking is off or
    failed (said once on stderr, like every tracking failure)."""
    return run.call(_register, model_dir, head, tracking.execution_tags())
