"""The one place that talks to MLflow.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a tracking server, a shared database), else a
SQLite database ``mlflow.db`` at the repository root. The root comes from ``DVC_ROOT``, which DVC
sets for every stage and points at the *parent* repository even inside a queued or ``--temp``
experiment, whose working directory is a throwaway copy: a relative ``sqlite:///mlflow.db`` would
land in that copy and vanish with it.

Every run is tagged with its stage, arm, DVC experiment name, git revision and a group key shared
by the runs of one ``dvc repro`` / ``dvc exp run``, so the UI can line the arms up. Runs are
grouped the MLflow way: each pipeline execution (one group key) has one parent run, named after
the DVC experiment and tagged with the git revision and the params hash, and every stage's run is
nested under it (``mlflow.parentRunId``), so the Experiments page shows one row per experiment
that expands into its stages. A stage rerun alone (``dvc repro -s train@multi``) has the same
revision and params, so it finds the same parent.

Tracking never kills training: if the backend is unreachable or locked, the first failure is
reported once on stderr and every later call becomes a no-op; DVC metrics and plots, written by
the stages themselves, stay complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

EXPERIMENT = "kd-pipeline"
DB_NAME = "mlflow.db"
# The tmp dir where DVC runs queued experiments; DVC_ROOT should never point there, but a
# hand-copied environment might.
_EXEC_TMP = os.path.join(".dvc", "tmp", "exps")


def repo_root() -> Path:
    """The repository that owns the tracking database (see module docstring)."""
    root = os.environ.get("DVC_ROOT")
    if root:
        root = str(Path(root).resolve())
        if _EXEC_TMP in root:
            root = root.split(os.sep + _EXEC_TMP)[0]
        return Path(root)
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        )
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd()


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{repo_root() / DB_NAME}"


def git_revision() -> str:
    # DVC sets the baseline revision for experiments; the workspace's HEAD otherwise.
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path.cwd()
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def params_hash(params_file: str | os.PathLike = "params.yaml") -> str:
    try:
        return hashlib.sha256(Path(params_file).read_bytes()).hexdigest()[:8]
    except OSError:
        return "noparams"


def group_key(params_file: str | os.PathLike = "params.yaml") -> str:
    """A key shared by every stage run of one `dvc repro` / `dvc exp run`.

    An experiment has a name (DVC_EXP_NAME). A plain `dvc repro` has none, but all its stages see
    the same git revision and params.yaml, so those two identify it.
    """
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    return f"workspace-{git_revision()[:8]}-{params_hash(params_file)}"


def execution_tags(group: str | None = None) -> dict[str, str]:
    """What identifies this pipeline execution, on every run and model version it makes: its
    group key, its DVC experiment and its git revision."""
    return {
        "kd.group": group or group_key(),
        "kd.dvc_exp": os.environ.get("DVC_EXP_NAME", "workspace"),
        "mlflow.source.git.commit": git_revision(),
    }


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: MLflow params are flat strings."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class Run:
    """A thin handle on one MLflow run that degrades to a no-op when the backend fails."""

    def __init__(self, mlflow_module, run_id: str | None):
        self._mlflow = mlflow_module
        self.run_id = run_id
        self._dead = run_id is None

    def _call(self, what, *args, client: bool = False, **kwargs):
        """``mlflow.<what>`` (``MlflowClient().<what>`` with ``client``, or ``what(mlflow)`` for a
        callable); the first failure turns this run into a no-op."""
        # Look the function up only when alive: a no-op Run has no mlflow module at all.
        if self._dead:
            return None
        try:
            if callable(what):
                return what(self._mlflow, *args, **kwargs)
            target = self._mlflow.MlflowClient() if client else self._mlflow
            return getattr(target, what)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any backend failure must not stop training
            self._dead = True
            what = getattr(what, "__name__", what)
            print(
                f"warning: MLflow {what} failed ({type(err).__name__}: {err}); tracking is off "
                "for the rest of this stage, DVC metrics and plots are still written",
                file=sys.stderr,
            )
            return None

    @property
    def active(self) -> bool:
        return not self._dead

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {metric_key(k): float(v) for k, v in metrics.items() if v is not None}
        self._call("log_metrics", clean, step=step)

    def log_params(self, params: Mapping[str, object]) -> None:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        self._call("log_params", flat)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path)

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", str(path), artifact_path)

    def call(self, fn, *args, **kwargs):
        """``fn(mlflow, *args, **kwargs)`` under the same guard as every other call: for what
        this handle has no method for (a model flavour, the registry)."""
        return self._call(fn, *args, **kwargs)

    def log_dataset(self, dataset, name: str, source: str | os.PathLike, context: str) -> None:
        """Record that this run read ``dataset`` (a Hugging Face Dataset or a pandas DataFrame):
        an MLflow dataset input with its name, source path, digest and schema, tagged
        ``context`` (``training``, ``evaluation``, ...), shown on the run's page."""

        def log(mlflow) -> None:
            import logging
            import warnings

            # Schema inference cannot type list columns (token ids): MLflow warns once per
            # dataset and logs it without a schema, which is all that is lost.
            quiet = logging.getLogger("mlflow")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if hasattr(dataset, "iloc"):
                        ds = mlflow.data.from_pandas(dataset, source=str(source), name=name)
                    else:
                        ds = mlflow.data.from_huggingface(dataset, path=str(source), name=name)
                    mlflow.log_input(ds, context=context)
            finally:
                quiet.setLevel(level)

        self._call(log)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact written by MLflow itself: for what must not land in an output."""
        self._call("log_text", text, artifact_file)


# MLflow accepts only these characters in a metric name; one outside them fails the whole
# batch, and the run's later metrics with it. Our keys (CSV columns, JSON keys) may use others,
# e.g. "attr/cos/hidden~logit" (kd/training/attribution.py).
_BAD_KEY_CHARS = re.compile(r"[^\w\-./ :]")


def metric_key(key: str) -> str:
    """``key`` as MLflow accepts it: any character MLflow rejects becomes "-"."""
    return _BAD_KEY_CHARS.sub("-", key)


# kd.role tells the two kinds of run apart: a pipeline execution (the parent) and a stage's run.
ROLE = "kd.role"
PIPELINE, STAGE = "pipeline", "stage"
# search_runs filters: the stage runs only, or the pipeline executions only.
STAGE_RUNS = f"tags.`{ROLE}` = '{STAGE}'"
PIPELINE_RUNS = f"tags.`{ROLE}` = '{PIPELINE}'"


def _parent(client, exp_id: str, group: str) -> str:
    """The parent run of this pipeline execution: found by its group key, or made now."""
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`kd.group` = '{group}' AND {PIPELINE_RUNS}",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id,
        run_name=group,
        tags={
            ROLE: PIPELINE,
            **execution_tags(group),
            "kd.params_sha256": params_hash(),
        },
    )
    return run.info.run_id


def _open(
    stage: str, arm: str | None, tags: Mapping[str, object], run_id: str | None, system: bool
):
    # MLflow's HTTP client retries for minutes by default; a stage should learn within seconds
    # that the server is down and carry on without it. A user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        exp_id = mlflow.create_experiment(
            EXPERIMENT,
            # Opens the UI on training runs (charts) instead of its GenAI traces view.
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    else:
        exp_id = exp.experiment_id
    name = f"{stage}@{arm}" if arm else stage
    group = group_key()
    client = mlflow.MlflowClient()
    parent = _parent(client, exp_id, group)
    # The parent says how the latest of its stages is doing (set back when the stage ends).
    client.update_run(parent, status="RUNNING")
    all_tags = {
        ROLE: STAGE,
        "mlflow.parentRunId": parent,
        "kd.stage": stage,
        **execution_tags(group),
        **({"kd.arm": arm} if arm else {}),
        **{k: str(v) for k, v in tags.items()},
    }
    if run_id is not None:
        try:
            # A resumed stage continues the run its checkpoint names: one curve, not two halves.
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system)
            return mlflow, run.info.run_id, parent
        except Exception:  # noqa: BLE001 - that run is gone (another database): start afresh
            pass
    run = mlflow.start_run(
        experiment_id=exp_id, run_name=name, tags=all_tags, log_system_metrics=system
    )
    return mlflow, run.info.run_id, parent


@contextlib.contextmanager
def start_run(
    stage: str,
    params: Mapping[str, object] | None = None,
    arm: str | None = None,
    tags: Mapping[str, object] | None = None,
    enabled: bool = True,
    run_id: str | None = None,
    runtime: Mapping[str, object] | None = None,
    system_metrics: bool = False,
) -> Iterator[Run]:
    """Open one tagged MLflow run for a stage; yields a :class:`Run` that never raises.

    ``runtime`` (kd.core.runtime.record: device, precision, threads, library versions) becomes
    ``runtime.<key>`` tags, beside the same record in the stage's own outputs.
    ``system_metrics`` samples CPU, memory (and GPU, where there is one) as ``system/*``
    metrics while the run is open: for the long stages.
    """
    if not enabled:
        yield Run(None, None)
        return
    try:
        mlflow, run_id, parent = _open(stage, arm, tags or {}, run_id, system_metrics)
    except Exception as err:  # noqa: BLE001
        print(
            f"warning: cannot reach MLflow at {tracking_uri()} ({type(err).__name__}: {err}); "
            "this stage runs without tracking, DVC metrics and plots are still written",
            file=sys.stderr,
        )
        yield Run(None, None)
        return
    handle = Run(mlflow, run_id)
    if params:
        handle.log_params(params)
    if runtime:
        handle.set_tags({f"runtime.{k}": v for k, v in runtime.items()})
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    finally:
        # KeyboardInterrupt included: the run is closed either way, marked by how it ended.
        handle._call("end_run", status=status)
        handle._call("set_terminated", parent, status=status, client=True)
