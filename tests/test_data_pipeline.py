"""The data half of the DAG (sample_corpus -> tokenize) run by DVC itself, in a throwaway repo.

The repository's own dvc.yaml, params.yaml, kd/ and stages/ are copied into a fresh git + DVC
repo; only params change: a tiny text corpus and a tiny random teacher, so the stages take seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import copy_project
from mlflow.tracking import MlflowClient

from kd.core.io import read_json
from kd.core.tracking import EXPERIMENT, STAGE_RUNS
from kd.data import tokens

pytestmark = pytest.mark.slow



def _set_params(path: Path, **sections: dict) -> None:
    # Rewrites params.yaml without its comments; fine for a throwaway repo.
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _ran(out: str) -> set[str]:
    return {s for s in ("sample_corpus", "tokenize") if f"Running stage '{s}'" in out}


@pytest.fixture
def pipeline_repo(git_dvc_repo, tiny_text_corpus, tiny_teacher_dir):
    repo = git_dvc_repo
    copy_project(repo.path)
    _set_params(
        repo.path / "params.yaml",
        corpus={"source": "text", "text_path": str(tiny_text_corpus), "test_fraction": 0.2},
        teacher={"source": str(tiny_teacher_dir)},
        # check_params runs first and checks the attention term's head counts against the teacher
        student={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 32},
        tokenize={"max_seq_length": 32},
    )
    repo.commit("pipeline")
    return repo


@pytest.mark.long
def test_repro_tokenize_then_up_to_date_then_params_change(pipeline_repo) -> None:
    repo = pipeline_repo
    out = repo.run("dvc", "repro", "tokenize")
    assert _ran(out) == {"sample_corpus", "tokenize"}, out

    data = repo.path / "data"
    for f in ("corpus/train.jsonl", "corpus/test.jsonl", "metrics/corpus.json"):
        assert (data / f).is_file(), f
    assert read_json(data / "metrics/corpus.json")["train"]["docs"] == 24
    assert read_json(data / "metrics/corpus.json")["test"]["docs"] == 6
    dd = tokens.load(data / "tokens")
    assert len(dd["train"]) > 0 and len(dd["test"]) > 0
    assert len(dd["train"][0]["input_ids"]) == 32
    stats = read_json(data / "metrics/tokens.json")
    assert stats["teacher_vocab_hash"] == stats["student_vocab_hash"]
    assert (repo.path / "dvc.lock").is_file()

    # Both stages tracked into the repo's own database, not the caller's.
    client = MlflowClient(tracking_uri=f"sqlite:///{repo.path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    stages = {r.data.tags["kd.stage"] for r in client.search_runs([exp.experiment_id], STAGE_RUNS)}
    assert stages == {"sample_corpus", "tokenize"}

    again = repo.run("dvc", "repro", "tokenize")
    assert _ran(again) == set(), again
    assert "Stage 'sample_corpus' didn't change, skipping" in again
    assert "Stage 'tokenize' didn't change, skipping" in again
    assert "Data and pipelines are up to date." in again

    # A corpus parameter changes the sample, and so the tokens downstream of it.
    repo.commit("first repro")
    changed = repo.run("dvc", "exp", "run", "-S", "corpus.n_docs=20", "tokenize")
    assert _ran(changed) == {"sample_corpus", "tokenize"}, changed
    assert read_json(data / "metrics/corpus.json")["train"]["docs"] == 16
    assert read_json(data / "metrics/corpus.json")["test"]["docs"] == 4

    # A tokenize-only parameter reruns tokenize alone.
    _set_params(repo.path / "params.yaml", tokenize={"max_seq_length": 16})
    only_tokens = repo.run("dvc", "repro", "tokenize")
    assert _ran(only_tokens) == {"tokenize"}, only_tokens
    assert len(tokens.load(data / "tokens")["train"][0]["input_ids"]) == 16


def test_oversized_sample_fails_with_the_fix(pipeline_repo) -> None:
    repo = pipeline_repo
    _set_params(repo.path / "params.yaml", corpus={"n_docs": 1000})
    out = repo.run("dvc", "repro", "sample_corpus", check=False)
    assert "corpus.n_docs=1000 is more than the 30 usable documents" in out
    assert not (repo.path / "data" / "corpus").exists()
