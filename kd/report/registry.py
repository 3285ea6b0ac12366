"""The distilled students where an MLflow user looks for a model: the model registry.

The report stages log an exported student (``data/distilled``, ``data/causal/distilled``) with
MLflow's transformers flavour, as a pipeline of its family's task (fill-mask, text-generation)
with its tokenizer and a signature inferred from an example, and register it under its family's
name (:data:`MLM`, :data:`CAUSAL`). A version is a set of weights: its identity is the digest of
the exported weight files (:func:`weights_digest`, tag ``kd.weights_sha256``), so a code edit
that changes the weights makes a new version even under the same git revision and params, and a
report rerun on the same weights adds none (it retags the version it finds). Each version is
tagged with the scheme, the headline metrics, the DVC experiment and the git revision of the
latest execution that exported it. The alias :data:`ALIAS` follows the weights exported last, so
``mlflow.transformers.load_model("models:/kd-student@newest")`` loads the last experiment's
student (``kd-causal-student@newest`` the causal one).
"""

from __future__ import annotations

import hashlib
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
MLM = Entry(
    "kd-student",
    "fill-mask",
    ["The capital of France is [MASK]."],
    ("test/logit_kl_t1", "test/mlm_top1", "test/agreement", "probe_linear_acc"),
)
CAUSAL = Entry(
    "kd-causal-student",
    "text-generation",
    ["The history of the Roman Empire"],
    ("perplexity", "kl_t1", "top1_agreement", "probe_linear_acc"),
)
NAME, EXAMPLE, METRIC_TAGS = MLM.name, MLM.example, MLM.metric_tags  # the MLM family's
ALIAS = "newest"  # MLflow reserves "latest"
DIGEST_TAG = "kd.weights_sha256"
# What save_pretrained writes the weights to (shards included); the rest of the folder (config,
# tokenizer, model card) describes them.
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over the weight files of a ``save_pretrained`` folder, names and bytes."""
    files = sorted({f for pattern in WEIGHT_FILES for f in Path(model_dir).glob(pattern)})
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no weight files ({', '.join(WEIGHT_FILES)})")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _requirements() -> list[str]:
    # Given explicitly: MLflow's own inference imports torchvision, which this project lacks.
    from importlib import metadata

    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in ("torch", "transformers")]


def _register(mlflow, model_dir: Path, head: dict, tags: dict[str, str], entry: Entry) -> str:
    client = mlflow.MlflowClient()
    name, digest = entry.name, weights_digest(model_dir)
    same = client.search_model_versions(f"name = '{name}' AND tag.`{DIGEST_TAG}` = '{digest}'")
    if same:
        version = str(same[0].version)
    else:
        from transformers import pipeline

        task = pipeline(entry.task, model=str(model_dir))
        info = mlflow.transformers.log_model(
            task,
            name="student",
            registered_model_name=name,
            input_example=entry.example,
            pip_requirements=_requirements(),
        )
        version = str(info.registered_model_version)
    for key in entry.metric_tags:
        if head.get(key) is not None:
            tags[f"metric.{key}"] = f"{head[key]:.4f}"
    for key, value in {"kd.scheme": head["scheme"], DIGEST_TAG: digest, **tags}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, ALIAS, version)
    return version


def register(run: tracking.Run, model_dir: Path, head: dict, entry: Entry = MLM) -> str | None:
    """Log and register ``model_dir`` in ``run`` as ``entry``'s model; the version, or None when
    tracking is off or failed (said once on stderr, like every tracking failure)."""
    return run.call(_register, model_dir, head, tracking.execution_tags(), entry)
