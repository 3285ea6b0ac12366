"""The distilled students where an MLflow user looks for a model: the model registry.

The report stages log an exported student (``data/distilled``, ``data/causal/distilled``) with
MLflow's transformers flavour, as a pipeline of its family's task (fill-mask, text-generation)
with its tokenizer and a signature inferred from an example, and register it under its family's
name (:data:`MLM`, :data:`CAUSAL`): one version per pipeline execution (a second report run in
the same ``dvc repro`` / ``dvc exp run`` reuses its version), tagged with the scheme, the
headline metrics, the DVC experiment and the git revision. The alias :data:`ALIAS` follows the
newest version, so ``mlflow.transformers.load_model("models:/kd-student@newest")`` is the last
experiment's student (``kd-causal-student@newest`` the causal one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kd.core import tracking


@dataclass(frozen=True)
class Entry:
    """One family's registered model."""

    name: str
    task: str  # the transformers pipeline logged
    example: list[str]  # the input MLflow infers the signature from
    metric_tags: tuple[str, ...]  # headline keys tagged on each version


# Version tags: the experiment's identity and the headline numbers (the MLM family's
# data/metrics/eval.json; the headline arm's entry of data/metrics/causal.json).
MLM = Entry("kd-student", "fill-mask", ["The capital of France is [MASK]."],
            ("test/logit_kl_t1", "test/mlm_top1", "test/agreement", "probe_linear_acc"))
CAUSAL = Entry("kd-causal-student", "text-generation", ["The history of the Roman Empire"],
               ("perplexity", "kl_t1", "top1_agreement", "probe_linear_acc"))
NAME, EXAMPLE, METRIC_TAGS = MLM.name, MLM.example, MLM.metric_tags  # the MLM family's
ALIAS = "newest"  # MLflow reserves "latest"


def _requirements() -> list[str]:
    # Given explicitly: MLflow's own inference imports torchvision, which this project lacks.
    from importlib import metadata

    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in ("torch", "transformers")]


def _register(mlflow, model_dir: Path, head: dict, tags: dict[str, str], entry: Entry) -> str:
    client = mlflow.MlflowClient()
    name, group = entry.name, tags["kd.group"]
    mine = client.search_model_versions(f"name = '{name}' AND tag.`kd.group` = '{group}'")
    if mine:
        version = mine[0].version
    else:
        from transformers import pipeline

        task = pipeline(entry.task, model=str(model_dir))
        info = mlflow.transformers.log_model(
            task, name="student", registered_model_name=name, input_example=entry.example,
            pip_requirements=_requirements(),
        )
        version = str(info.registered_model_version)
        for key in entry.metric_tags:
            if head.get(key) is not None:
                tags[f"metric.{key}"] = f"{head[key]:.4f}"
        for key, value in {"kd.scheme": head["scheme"], **tags}.items():
            client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, ALIAS, version)
    return version


def register(run: tracking.Run, model_dir: Path, head: dict, entry: Entry = MLM) -> str | None:
    """Log and register ``model_dir`` in ``run`` as ``entry``'s model; the version, or None when
    tracking is off or failed (said once on stderr, like every tracking failure)."""
    return run.call(_register, model_dir, head, tracking.execution_tags(), entry)
