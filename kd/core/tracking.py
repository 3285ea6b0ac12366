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

Tracking never kills training, and loses nothing when the backend fails (a server down, a
restart, a locked database). Every call is queued until MLflow has it: each metric point keeps
the step and the wall-clock time it was logged at, the stage's run is opened on the first call
that reaches the backend (with the stage's start time, so a server down when the stage starts
costs nothing), and what a failed call could not deliver is sent again with the next call, at
most every ``KD_TRACKING_RETRY_S`` seconds (default 10), and at the stage's end, for up to
``KD_TRACKING_FINAL_WAIT_S`` seconds (default 10). A retry cannot add a point twice: MLflow's SQL
stores keep one copy of a point with the same key, step, time and value. What is still
undelivered at the end is kept in ``mlflow-pending/`` at the repository root, the stage says how
many points, and ``python -m kd.core.tracking replay`` sends them later (into the same run, or a
run opened then with the stage's tags and start time). DVC metrics and plots, written by the
stages themselves, are complete either way.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
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


RETRY_ENV = "KD_TRACKING_RETRY_S"
FINAL_WAIT_ENV = "KD_TRACKING_FINAL_WAIT_S"
PENDING_DIR = "mlflow-pending"  # at the repository root; git-ignored
REPLAY = "python -m kd.core.tracking replay"
# MLflow's limits per log_batch request.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
# Refusals that no retry can change (a param logged again with another value, a malformed key):
# the batch is dropped and counted, not queued forever.
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}


def _seconds(env: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(env, default)))
    except ValueError:
        return default


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Spec:
    """What a stage's run is opened with, fixed when the stage starts: a run opened late, or by
    a replay in another process, is the run the stage would have opened."""

    uri: str
    stage: str
    arm: str | None
    group: str
    tags: dict[str, str]  # the stage run's own (role, parent-independent identity, the stage's)
    parent_tags: dict[str, str]  # for the pipeline execution's run, if it has to be made
    start_ms: int = field(default_factory=_now_ms)
    resume_run_id: str | None = None  # the run a resumed stage continues
    system_metrics: bool = False

    @property
    def name(self) -> str:
        return f"{self.stage}@{self.arm}" if self.arm else self.stage


class Run:
    """One stage's MLflow run: every call is queued and delivered when the backend answers.

    Methods never raise. ``Run(None)`` is a no-op (tracking disabled, or a rank other than 0).
    ``client`` makes an ``MlflowClient`` for a tracking URI (tests hand in a failing one);
    ``fluent`` makes the run MLflow's active run in this process once it is open, for what
    needs one (system metrics, ``mlflow.transformers.log_model``): a replay does not.
    """

    def __init__(self, spec: Spec | None, *, client: Callable | None = None,
                 fluent: bool = True):  # fmt: skip
        self.spec = spec
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self._client_of = client
        self._fluent = fluent
        self._live = False  # MLflow's active run in this process
        self._metrics: list[tuple[str, float, int, int]] = []  # key, value, time (ms), step
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._files: list[tuple[str, str | None]] = []  # artifacts: local path, artifact path
        self._texts: list[tuple[str, str]] = []  # text, artifact file
        self._deferred: list[tuple[str, Callable]] = []  # fn(mlflow), kept in memory only
        self._status: str | None = None  # the run's end, once the stage has ended
        self.logged = 0  # metric points logged by the stage
        self.rejected = 0  # points MLflow refused for good (said on stderr)
        self.lost: list[str] = []  # what could not be done and cannot be replayed
        self._next_try = 0.0
        self._failing = False

    # --- what a stage calls ----------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Tracking is on for this run (whether or not the backend has answered yet)."""
        return self.spec is not None

    @property
    def pending(self) -> int:
        """Metric points logged and not yet delivered."""
        return len(self._metrics)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.spec is None:
            return
        ms = _now_ms()
        points = [(metric_key(k), float(v), ms, int(step or 0))
                  for k, v in metrics.items() if v is not None]  # fmt: skip
        self._metrics.extend(points)
        self.logged += len(points)
        self._soon()

    def log_params(self, params: Mapping[str, object]) -> None:
        if self.spec is None:
            return
        self._params.update({k: str(v)[:6000] for k, v in flatten(params).items()})
        self._soon()

    def set_tags(self, tags: Mapping[str, object]) -> None:
        if self.spec is None:
            return
        self._tags.update({k: str(v) for k, v in tags.items()})
        self._soon()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._log_files(path, artifact_path)

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._log_files(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact written by MLflow itself: for what must not land in an output."""
        if self.spec is None:
            return
        self._texts.append((text, artifact_file))
        self._soon()

    def log_dataset(self, dataset, name: str, source: str | os.PathLike, context: str) -> None:
        """Record that this run read ``dataset`` (a Hugging Face Dataset or a pandas DataFrame):
        an MLflow dataset input with its name, source path, digest and schema, tagged
        ``context`` (``training``, ``evaluation``, ...), shown on the run's page. Queued like
        the rest, in memory only (a replay cannot rebuild the dataset)."""
        if self.spec is None:
            return

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

        self._deferred.append((f"dataset input {name}", log))
        self._soon()

    def call(self, fn, *args, **kwargs):
        """``fn(mlflow, *args, **kwargs)`` now, with this run active, for what this handle has
        no method for (a model flavour, the registry); its result, or None when the backend
        cannot be reached or ``fn`` fails (said on stderr; not retried: the caller decides)."""
        if self.spec is None:
            return None
        what = getattr(fn, "__name__", str(fn))
        if not self.flush(only_open=True):
            self._say(f"warning: MLflow is unreachable, so {what} was not done")
            self.lost.append(what)
            return None
        try:
            import mlflow

            return fn(mlflow, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any backend failure must not stop a stage
            self._say(f"warning: MLflow {what} failed ({type(err).__name__}: {err}); not done")
            self.lost.append(what)
            return None

    # --- delivery --------------------------------------------------------------------------

    def _log_files(self, path, artifact_path) -> None:
        if self.spec is None:
            return
        self._files.append((str(Path(path).resolve()), artifact_path))
        self._soon()

    def _soon(self) -> None:
        """Deliver now, unless the backend failed less than ``KD_TRACKING_RETRY_S`` ago."""
        if time.monotonic() >= self._next_try:
            self.flush()

    def _client(self):
        if self._client_of is not None:
            return self._client_of(self.spec.uri)
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.spec.uri)

    def flush(self, only_open: bool = False) -> bool:
        """Send what is queued (``only_open``: just open the run); True when all of it went."""
        if self.spec is None:
            return True
        try:
            client = self._client()
            if self.run_id is None:
                self._open(client)
            if self._fluent and not self._live and (self._status is None or self._deferred):
                self._activate()
            if not only_open:
                self._send(client)
        except Exception as err:  # noqa: BLE001 - any backend failure must not stop a stage
            self._next_try = time.monotonic() + _seconds(RETRY_ENV, 10.0)
            if not self._failing:
                self._failing = True
                self._say(
                    f"warning: MLflow at {self.spec.uri} failed ({type(err).__name__}: "
                    f"{str(err)[:300]}); {self.spec.name} keeps what it logs and sends it again "
                    f"every {_seconds(RETRY_ENV, 10.0):g} s and at its end; DVC metrics and "
                    "plots are still written"
                )
            return False
        if self._failing:
            self._failing = False
            self._say(f"MLflow at {self.spec.uri} answers again: {self.spec.name}'s queue sent")
        return True

    def _open(self, client) -> None:
        from mlflow.exceptions import MlflowException

        spec = self.spec
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            try:
                exp_id = client.create_experiment(
                    EXPERIMENT,
                    # Opens the UI on training runs (charts) instead of its GenAI traces view.
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            except MlflowException:
                # Made meanwhile by a stage of another queued experiment.
                exp = client.get_experiment_by_name(EXPERIMENT)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        if self.parent_id is None:
            self.parent_id = _parent(client, exp_id, spec.group, spec.parent_tags)
        run_id = None
        if spec.resume_run_id is not None:
            # A resumed stage continues the run its checkpoint names: one curve, not two halves.
            try:
                client.get_run(spec.resume_run_id)
                run_id = spec.resume_run_id
                client.update_run(run_id, status="RUNNING")
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # That run is gone (another database): start afresh.
        if run_id is None:
            tags = {**spec.tags, "mlflow.parentRunId": self.parent_id}
            run_id = client.create_run(exp_id, start_time=spec.start_ms, tags=tags,
                                       run_name=spec.name).info.run_id  # fmt: skip
        self.run_id = run_id
        # The parent says how the latest of its stages is doing (set back when the stage ends).
        client.update_run(self.parent_id, status="RUNNING")

    def _activate(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.spec.uri)
        mlflow.start_run(run_id=self.run_id, log_system_metrics=self.spec.system_metrics)
        self._live = True

    def _deactivate(self) -> None:
        """Stop being MLflow's active run (and its system-metrics sampler) without a call to
        the backend, which may be down: the run's status is sent with the queue."""
        import mlflow
        from mlflow.tracking import fluent

        self._live = False
        with contextlib.suppress(Exception):
            monitor = fluent.run_id_to_system_metrics_monitor.pop(self.run_id, None)
            if monitor is not None:
                monitor.finish()
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            with contextlib.suppress(Exception):  # it pops the run, then tells the backend
                mlflow.end_run(self._status or "FINISHED")

    def _send(self, client) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = self.run_id
        while self._params:
            chunk = dict(list(self._params.items())[:_MAX_PARAMS])
            self._batch(client, "params", len(chunk), run_id,
                        params=[Param(k, v) for k, v in chunk.items()])  # fmt: skip
            for k in chunk:
                del self._params[k]
        while self._tags:
            chunk = dict(list(self._tags.items())[:_MAX_TAGS])
            self._batch(client, "tags", len(chunk), run_id,
                        tags=[RunTag(k, v) for k, v in chunk.items()])  # fmt: skip
            for k in chunk:
                del self._tags[k]
        while self._metrics:
            chunk = self._metrics[:_MAX_METRICS]
            self._batch(client, "points", len(chunk), run_id,
                        metrics=[Metric(k, v, ms, s) for k, v, ms, s in chunk])  # fmt: skip
            del self._metrics[: len(chunk)]
        while self._files:
            path, artifact_path = self._files[0]
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path)
            else:
                client.log_artifact(run_id, path, artifact_path)
            self._files.pop(0)
        while self._texts:
            client.log_text(run_id, *self._texts[0])
            self._texts.pop(0)
        while self._deferred:
            import mlflow

            what, fn = self._deferred[0]
            if not self._live:  # after the stage's end: MLflow's active run is gone
                self._deferred.pop(0)
                self.lost.append(what)
                continue
            fn(mlflow)
            self._deferred.pop(0)
        if self._status is not None:
            if self._live:
                self._deactivate()
            client.set_terminated(run_id, status=self._status)
            client.set_terminated(self.parent_id, status=self._status)
            self._status = None

    def _batch(self, client, what: str, n: int, run_id: str, **batch) -> None:
        """One ``log_batch``; a refusal no retry can change drops the batch, said once."""
        from mlflow.exceptions import MlflowException

        try:
            client.log_batch(run_id, **batch)
        except MlflowException as err:
            if err.error_code not in _REJECTED:
                raise
            if what == "points":
                self.rejected += n
            self._say(f"warning: MLflow refused {n} {what} of {self.spec.name} "
                      f"({str(err)[:300]}); dropped")  # fmt: skip

    def close(self, status: str) -> None:
        """The stage has ended (``status``: FINISHED or FAILED): deliver everything, waiting up
        to ``KD_TRACKING_FINAL_WAIT_S`` for the backend, then keep what is left for a replay
        and say how much that is."""
        if self.spec is None:
            return
        self._status = status
        deadline = time.monotonic() + _seconds(FINAL_WAIT_ENV, 10.0)
        # Before waiting: a stage whose run never opened leaves MLflow's active-run state alone.
        while not self.flush():
            if self._live:
                self._deactivate()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(1.0, left))
        if self._live:
            self._deactivate()
        if self.lost:
            self._say(f"warning: {self.spec.name}: not in MLflow and not replayable: "
                      f"{', '.join(self.lost)}")  # fmt: skip
        if not self.undelivered:
            return
        path = self.dump(repo_root() / PENDING_DIR)
        self._say(
            f"warning: {self.spec.name}: {self.pending} of its {self.logged} metric points "
            f"(and {self.undelivered - self.pending} other records) did not reach MLflow at "
            f"{self.spec.uri}; they are kept in {path}: send them with `{REPLAY}` once it "
            "answers"
        )

    @property
    def undelivered(self) -> int:
        """Records still queued that a replay can send (points, params, tags, files, the end)."""
        return (len(self._metrics) + len(self._params) + len(self._tags) + len(self._files)
                + len(self._texts) + (self._status is not None) + (self.run_id is None))  # fmt: skip

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # --- kept for later --------------------------------------------------------------------

    def dump(self, folder: Path, path: Path | None = None) -> Path:
        """Write what is still queued to ``path`` (a new file in ``folder``), artifact files
        copied beside it (the stage's own may live in a queued experiment's throwaway copy)."""
        folder.mkdir(parents=True, exist_ok=True)
        if path is None:
            stem = (f"{time.strftime('%Y%m%d-%H%M%S')}-{self.spec.name.replace('@', '-')}-"
                    f"{uuid.uuid4().hex[:6]}")  # fmt: skip
            path = folder / f"{stem}.json"
        files_dir = path.with_suffix("")
        files = []
        for i, (src, artifact_path) in enumerate(self._files):
            if Path(src).is_relative_to(files_dir):
                files.append((src, artifact_path))  # kept by an earlier dump
                continue
            dest = files_dir / str(i) / Path(src).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
            elif Path(src).exists():
                shutil.copy2(src, dest)
            files.append((str(dest), artifact_path))
        record = {
            "format": 1,
            "spec": asdict(self.spec),
            "run_id": self.run_id,
            "parent_id": self.parent_id,
            "params": self._params,
            "tags": self._tags,
            "metrics": self._metrics,
            "files": files,
            "texts": self._texts,
            "status": self._status,
            "lost": self.lost,
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path, uri: str | None = None, client: Callable | None = None) -> Run:
        """A run's queue as :meth:`dump` wrote it, to send to ``uri`` (default: where the stage
        was tracking)."""
        record = json.loads(Path(path).read_text())
        spec = Spec(**record["spec"])
        if uri:
            spec.uri = uri
        run = cls(spec, client=client, fluent=False)
        run.run_id, run.parent_id = record["run_id"], record["parent_id"]
        run._params, run._tags = record["params"], record["tags"]
        run._metrics = [tuple(m) for m in record["metrics"]]
        run._files = [tuple(f) for f in record["files"]]
        run._texts = [tuple(t) for t in record["texts"]]
        run._status, run.lost = record["status"], record["lost"]
        run.logged = len(run._metrics)
        return run


def replay(paths: list[Path], uri: str | None = None) -> int:
    """Send the queues kept in ``paths`` (files :meth:`Run.dump` wrote); returns how many
    metric points are still undelivered. A file fully sent is deleted; one that is not keeps
    what is left (and the run it was sent to, so a second replay adds to the same run)."""
    _quick_http()
    left = 0
    for path in paths:
        meant_for = json.loads(Path(path).read_text())["spec"]["uri"]
        run = Run.load(path, uri)
        points = run.pending
        run._failing = True  # one line per file, below, not a warning per outage
        if run.flush():
            path.unlink()
            shutil.rmtree(path.with_suffix(""), ignore_errors=True)
            print(f"{path.name}: {points} points sent to run {run.run_id} "
                  f"({run.spec.name}) at {run.spec.uri}")  # fmt: skip
        else:
            if run.run_id is None:  # nothing landed at ``uri``: keep the stage's own target
                run.spec.uri = meant_for
            run.dump(path.parent, path)
            left += run.pending
            print(f"{path.name}: {points - run.pending} of {points} points sent; "
                  f"{run.spec.uri} did not answer, kept", file=sys.stderr)  # fmt: skip
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kd.core.tracking",
        description="Send to MLflow what stages could not deliver (kept in mlflow-pending/).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("replay", help="send kept points, params, tags and artifacts")
    cmd.add_argument("paths", nargs="*", type=Path,
                     help=f"files or folders (default: <repo root>/{PENDING_DIR})")  # fmt: skip
    cmd.add_argument("--tracking-uri", help="send there instead of where each stage tracked")
    args = parser.parse_args(argv)
    files: list[Path] = []
    for p in args.paths or [repo_root() / PENDING_DIR]:
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    if not files:
        print("nothing to replay")
        return 0
    left = replay(files, args.tracking_uri)
    return 1 if left else 0


def _quick_http() -> None:
    # MLflow's HTTP client retries for minutes by default; a stage (or a replay) should learn
    # within seconds that the server is down and keep its queue meanwhile. A user's own settings
    # win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _parent(client, exp_id: str, group: str, tags: Mapping[str, str]) -> str:
    """The parent run of this pipeline execution: found by its group key, or made now."""
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`kd.group` = '{group}' AND {PIPELINE_RUNS}",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name=group, tags=dict(tags)).info.run_id


def stage_spec(stage: str, arm: str | None = None, tags: Mapping[str, object] | None = None,
               run_id: str | None = None, system_metrics: bool = False) -> Spec:  # fmt: skip
    """Everything that identifies a stage's run, read from the environment now."""
    group = group_key()
    return Spec(
        uri=tracking_uri(),
        stage=stage,
        arm=arm,
        group=group,
        tags={
            ROLE: STAGE,
            "kd.stage": stage,
            **execution_tags(group),
            **({"kd.arm": arm} if arm else {}),
            **{k: str(v) for k, v in (tags or {}).items()},
        },
        parent_tags={ROLE: PIPELINE, **execution_tags(group), "kd.params_sha256": params_hash()},
        resume_run_id=run_id,
        system_metrics=system_metrics,
    )


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
    metrics while the run is open: for the long stages. ``run_id``: the run a resumed stage
    continues (a new one if the backend no longer has it).
    """
    if not enabled:
        yield Run(None)
        return
    _quick_http()
    handle = Run(stage_spec(stage, arm, tags, run_id, system_metrics))
    handle.flush()  # the run shows as running from the start, when the backend answers
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
        handle.close(status)


if __name__ == "__main__":
    sys.exit(main())
