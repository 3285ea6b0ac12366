"""Shared fixtures: tiny, deterministic, offline inputs for every test.

Nothing here touches the network or the repository's own outputs: MLflow goes to a per-test SQLite
file, and the hub libraries are told they are offline before anything imports them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `pytest` (not only `python -m pytest`) must find kd/ and stages/ without an install.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Set at import time too: huggingface_hub and datasets read these when they are first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from kd.core.params import TRACE_ENV as PARAMS_TRACE_ENV  # noqa: E402
from kd.data.corpus import Document  # noqa: E402

_SUBJECTS = [
    "The river",
    "A small village",
    "The old library",
    "Our committee",
    "The mountain railway",
    "A young composer",
    "The northern province",
    "This museum",
    "The football club",
    "A chemist",
]
_VERBS = [
    "was founded in",
    "became famous for",
    "is known for",
    "was rebuilt after",
    "depends on",
    "celebrated",
    "was described in",
    "lies close to",
    "grew rapidly during",
    "opened with",
]
_OBJECTS = [
    "the great flood of 1824",
    "its unusual bridges",
    "a collection of rare maps",
    "the annual harvest festival",
    "several symphonies",
    "the coastal trade routes",
    "a long winter",
    "modern glass architecture",
    "an international tournament",
    "the discovery of a new element",
    "the eastern valley",
    "quiet summer evenings",
]


def make_docs(n: int = 30, seed: int = 0, prefix: str = "doc") -> list[Document]:
    """``n`` distinct documents of 2-4 English sentences each, the same for the same seed."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
            for _ in range(rng.randint(2, 4))
        ]
        # The number keeps every document distinct, so deduplication never shrinks the set.
        docs.append(Document(id=f"{prefix}-{i:03d}", text=f"Entry {i}. " + " ".join(sentences)))
    return docs


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test tracks into its own database and stays offline."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # A test run from inside a DVC stage must not inherit the stage's experiment identity.
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", PARAMS_TRACE_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def default_tokenizer():
    from kd.data.assets import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, default_tokenizer) -> Path:
    """A tiny random BERT masked LM on the default vocabulary, saved like a real teacher."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from kd.data.assets import default_teacher_dir

    path = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    BertForMaskedLM(config).save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    # transformers 5 saves only tokenizer.json; a student built from a config rebuilds its
    # tokenizer from the teacher's vocab.txt (kd.data.assets.rebuilt_tokenizer), so ship it too.
    shutil.copy(default_teacher_dir() / "vocab.txt", path / "vocab.txt")
    return path


@pytest.fixture
def tiny_docs() -> list[Document]:
    return make_docs(30)


@pytest.fixture
def tiny_text_corpus(tmp_path) -> Path:
    """A folder with one .txt (blank-line separated), one .jsonl and one .parquet file.

    Ten documents per file, all distinct: 30 usable documents in all.
    """
    import pandas as pd

    folder = tmp_path / "text_corpus"
    folder.mkdir()
    docs = make_docs(30, seed=1)
    (folder / "a.txt").write_text("\n\n".join(d.text for d in docs[:10]) + "\n", encoding="utf-8")
    with (folder / "b.jsonl").open("w", encoding="utf-8") as f:
        for d in docs[10:20]:
            f.write(json.dumps({"text": d.text}) + "\n")
    pd.DataFrame({"text": [d.text for d in docs[20:]]}).to_parquet(folder / "c.parquet")
    return folder


@dataclass
class GitDvcRepo:
    """A throwaway git + DVC repository, and how to run commands in it.

    ``env`` has a git identity (``dvc exp run --queue`` needs one), no ``MLFLOW_TRACKING_URI``
    (so stages track into ``<path>/mlflow.db`` as they would for a user) and this checkout on
    ``PYTHONPATH`` after the repo itself.
    """

    path: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 300, check: bool = True) -> str:
        """Run ``cmd`` (``dvc ...`` goes through this interpreter); return stdout + stderr."""
        if cmd[0] == "dvc":
            cmd = (sys.executable, "-m", "dvc", *cmd[1:])
        out = subprocess.run(
            cmd, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
            )
        return out.stdout + out.stderr

    def commit(self, message: str = "commit") -> str:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)
        return self.run("git", "rev-parse", "HEAD").strip()

    def run_queue(self, deadline_s: float = 600, jobs: int = 1) -> str:
        """``dvc queue start -j jobs``, wait until nothing is queued or running, stop the
        workers; returns the last ``dvc queue status``."""
        import time

        self.run("dvc", "queue", "start", "-j", str(jobs))
        try:
            end = time.monotonic() + deadline_s
            while time.monotonic() < end:
                status = self.run("dvc", "queue", "status")
                if not any(s in status for s in ("Queued", "Running")):
                    return status
                time.sleep(2)
            raise AssertionError(f"the DVC queue did not finish in {deadline_s}s:\n{status}")
        finally:
            self.run("dvc", "queue", "stop", timeout=60)


def repo_env(path: Path, *importable: Path) -> dict[str, str]:
    """The environment of a user's shell in ``path``: a git identity, no tracking URI, no DVC
    stage identity, and only that repository (plus ``importable``) on the import path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "MLFLOW_TRACKING_URI" and not k.startswith("DVC_")
    }
    env.update(
        GIT_AUTHOR_NAME="kd tests",
        GIT_AUTHOR_EMAIL="kd-tests@example.com",
        GIT_COMMITTER_NAME="kd tests",
        GIT_COMMITTER_EMAIL="kd-tests@example.com",
        GIT_CONFIG_NOSYSTEM="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(str(p) for p in (path, *importable)),
    )
    return env


# What a copy of this project needs to run its DAG: the top-level files dvc.yaml reads or depends
# on (pin_inputs checks the installed libraries against requirements.lock), the ignore files that
# decide what git versions, and the code.
PROJECT_FILES = ("dvc.yaml", "causal/dvc.yaml", "params.yaml", "requirements.lock", ".gitignore",
                 ".dvcignore")
PROJECT_PACKAGES = ("kd", "stages")


def copy_project(dest: Path) -> None:
    """Copy this project's DAG, params, lock, ignore files and code into the folder ``dest``."""
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, dest / name)
    for pkg in PROJECT_PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture
def git_dvc_repo(tmp_path) -> GitDvcRepo:
    """An initialised, empty git + DVC repo (no commit yet) in ``tmp_path / 'repo'``."""
    path = tmp_path / "repo"
    path.mkdir()
    repo = GitDvcRepo(path, repo_env(path, REPO))
    repo.run("git", "init", "-q")
    repo.run("dvc", "init", "-q")
    repo.run("dvc", "config", "core.analytics", "false")
    with (path / ".gitignore").open("a") as f:
        f.write("mlflow.db\nmlflow.db-*\n__pycache__/\n")
    return repo


# --- The whole DAG on tiny assets, reproduced once per session -----------------------------------
# Shared by tests/test_pipeline.py and tests/test_mlflow_server.py. Tests that change anything work
# on a `clone()` of the built repository, so the one `dvc repro` here is paid for once.

# Per-section overrides of params.yaml: one thread, a tiny student with the teacher's 2 heads (the multi
# scheme's attention term compares heads one to one), 6 training steps, two batches per split.
TINY_PIPELINE_PARAMS = {
    # One thread: on a busy 2-core machine, two threads per stage make tiny steps ~10x slower.
    "base": {"threads": 1},
    "corpus": {"source": "text", "test_fraction": 0.2},
    "tokenize": {"max_seq_length": 32},
    "student": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    },
    "train": {
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 2,
        "log_every": 2,
        "checkpoint_every": 2,
    },
    "evaluate": {"batch_size": 4, "train_batches": 2, "test_batches": 2, "lstsq_batches": 2},
    # A toy three-topic folder (written by the fixture), not the 2,225 BBC articles; 2 fine-tune steps.
    "probe": {
        "source": "folder",
        "max_seq_length": 32,
        "batch_size": 16,
        "finetune_steps": 2,
        "finetune_batch_size": 4,
        "finetune_warmup_steps": 1,
    },
    # Applied only where params.yaml has the section and the key (stages still being added).
    "quantize": {
        "batch_size": 4,
        "test_batches": 2,
        "latency_batch_sizes": [1, 4],
        "latency_seq_length": 32,
        "warmup_batches": 1,
        "latency_batches": 2,
    },
}


def tiny_params(corpus: Path, teacher: Path, probe_folder: Path) -> dict:
    """This repository's params.yaml with TINY_PIPELINE_PARAMS and the given tiny inputs."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY_PIPELINE_PARAMS.items():
        if section in raw:
            raw[section].update({k: v for k, v in values.items() if k in raw[section]})
    raw["corpus"]["text_path"] = str(corpus)
    raw["probe"]["folder"] = str(probe_folder)
    # It has a masked-LM head, so prepare_teacher skips adaptation and only scores it.
    raw["teacher"]["source"] = str(teacher)
    return raw


def project_repo(path: Path) -> GitDvcRepo:
    """A new git + DVC repository at ``path`` holding a copy of this project (its DAG, params,
    lock, code and ignore files: the small results are committed as in the real repo)."""
    path.mkdir()
    repo = GitDvcRepo(path, repo_env(path))
    repo.run("git", "init", "-q")
    repo.run("dvc", "init", "-q")
    repo.run("dvc", "config", "core.analytics", "false")
    copy_project(path)
    return repo


@dataclass
class TinyPipeline:
    """A git + DVC copy of this project whose whole DAG has run once on tiny assets.

    ``repo`` holds the reproduced and committed result (outputs, small results in git);
    ``pristine`` the committed repository before its first ``dvc repro`` (no outputs, empty DVC
    cache); ``repro_out`` what that ``dvc repro`` printed.
    """

    repo: GitDvcRepo
    pristine: Path
    repro_out: str
    repro_seconds: float
    params_traces: Path  # what each stage of that `dvc repro` read from params.yaml

    @staticmethod
    def clone(src: Path, dest: Path) -> GitDvcRepo:
        """A full copy (git history, DVC cache, outputs) that can be changed independently."""
        shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        return GitDvcRepo(dest, repo_env(dest))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_teacher_dir) -> TinyPipeline:
    import time

    import yaml
    from tiny import topic_folder

    root = tmp_path_factory.mktemp("tiny_pipeline")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(d.text for d in make_docs(60, seed=2)) + "\n", encoding="utf-8")

    repo = project_repo(root / "repo")
    path = repo.path
    raw = tiny_params(corpus, tiny_teacher_dir, topic_folder(root / "probe_topics", per_class=10))
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    # The MLM study alone (the causal one has its own tiny repo, test_causal_pipeline's
    # causal_run): a causal pipeline that never ran has no lock, and `dvc exp apply`, queued
    # experiments and `dvc status` would each stop on its missing hashes.
    shutil.rmtree(path / "causal")
    repo.commit("tiny pipeline")

    pristine = root / "pristine"
    shutil.copytree(path, pristine, symlinks=True)
    # Every stage records the params keys it reads (kd.core.params), for the DAG-contract test.
    traces = root / "params-traces"
    repo.env[PARAMS_TRACE_ENV] = str(traces)
    start = time.perf_counter()
    out = repo.run("dvc", "repro", timeout=1200)
    seconds = time.perf_counter() - start
    del repo.env[PARAMS_TRACE_ENV]
    repo.commit("dvc repro")
    return TinyPipeline(repo, pristine, out, seconds, traces)


@dataclass
class TinyExperiment:
    """A clone of the tiny pipeline after one ``dvc exp run -S loss.scheme=logit``.

    Two pipeline executions in its ``mlflow.db``: the tiny ``dvc repro`` and this experiment
    (which reruns the report). ``baseline`` holds the clone's
    ``data/metrics`` JSON files before the experiment, by file name; ``out`` what DVC printed."""

    repo: GitDvcRepo
    out: str
    baseline: dict[str, dict]


@pytest.fixture(scope="session")
def tiny_experiment(tiny_pipeline, tmp_path_factory) -> TinyExperiment:
    repo = tiny_pipeline.clone(
        tiny_pipeline.repo.path, tmp_path_factory.mktemp("tiny_exp") / "repo"
    )
    metrics = repo.path / "data" / "metrics"
    baseline = {p.name: json.loads(p.read_text()) for p in metrics.glob("*.json")}
    out = repo.run("dvc", "exp", "run", "-S", "loss.scheme=logit", timeout=900)
    return TinyExperiment(repo, out, baseline)
