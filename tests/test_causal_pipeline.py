"""The causal family as a user runs it: `model.family: causal` and the causal_* stages of dvc.yaml,
on a tiny random Llama teacher (a local folder) and a word-level tokenizer, with DVC.

One `dvc repro causal_report` per module (about a minute); the tests then read what it wrote,
check the params each stage read against dvc.yaml, and (the `long` ones) change things as a user
would with `dvc exp run`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import GitDvcRepo, make_docs, project_repo, tiny_params
from dagcheck import read_traces, stages, undeclared_params
from tiny import tiny_llama, topic_folder, word_tokenizer

from kd.core.params import TRACE_ENV

pytestmark = pytest.mark.slow

CAUSAL = [
    "causal_teacher", "causal_student", "causal_tokenize", "causal_cache", "causal_train@logit",
    "causal_train@multi", "causal_evaluate@logit", "causal_evaluate@multi",
    "causal_evaluate_init", "causal_report",
]  # fmt: skip


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def causal_teacher_folder(path: Path, docs) -> Path:
    """A 4-block random Llama and a word tokenizer over the documents' words, saved."""
    words = sorted({w for d in docs for w in re.findall(r"\w+|[^\w\s]", d.text)})
    tok = word_tokenizer(words)
    model = tiny_llama(layers=4, vocab=len(tok) + 2, seed=0)
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def causal_params(raw: dict, teacher: Path) -> dict:
    raw["model"]["family"] = "causal"
    c = raw["causal"]
    c.update(teacher=str(teacher), block_size=16, train_blocks=24, test_blocks=8, top_k=8)
    c["student"] = {"layers": 2, "config": None}
    c["train"].update(batch_size=4, max_steps=6, warmup_steps=2, log_every=2, checkpoint_every=2)
    c["evaluate"].update(batch_size=4, max_new_tokens=4, prompts=["The river", "A chemist"])
    return raw


@dataclass
class CausalRun:
    repo: GitDvcRepo
    out: str
    traces: Path


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, tiny_teacher_dir) -> CausalRun:
    root = tmp_path_factory.mktemp("causal_pipeline")
    docs = make_docs(80, seed=3)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(d.text for d in docs) + "\n", encoding="utf-8")
    teacher = causal_teacher_folder(root / "llama", docs)
    repo = project_repo(root / "repo")
    path = repo.path
    raw = causal_params(tiny_params(corpus, tiny_teacher_dir, topic_folder(root / "topics", 10)),
                        teacher)  # fmt: skip
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    repo.commit("tiny causal")
    traces = root / "traces"
    repo.env[TRACE_ENV] = str(traces)
    out = repo.run("dvc", "repro", "causal_report", timeout=900)
    del repo.env[TRACE_ENV]
    repo.commit("causal repro")
    return CausalRun(repo, out, traces)


def test_the_causal_stages_run_and_only_they(causal_run) -> None:
    ran = _ran(causal_run.out)
    assert set(CAUSAL) <= ran
    assert not {"train@logit", "train@multi", "tokenize", "report"} & ran


def test_the_headline_metrics_are_finite_and_ordered(causal_run) -> None:
    path = causal_run.repo.path
    m = json.loads((path / "data/metrics/causal.json").read_text())
    assert set(m) == {"teacher", "student_init", "logit", "multi"}
    for name in ("student_init", "logit", "multi"):
        for key in ("perplexity", "kl_t1", "top1_agreement"):
            assert math.isfinite(m[name][key]), (name, key)
        assert m[name]["kl_t1"] >= 0 and 0 <= m[name]["top1_agreement"] <= 1
    # Six steps of distillation move a random 2-of-4-block student toward its teacher.
    assert m["logit"]["kl_t1"] < m["student_init"]["kl_t1"]
    for arm in ("logit", "multi"):
        assert math.isfinite(m[arm]["mean_grad_norm"]) and m[arm]["mean_grad_norm"] > 0
    # `dvc metrics show` reads it: the causal numbers are versioned beside the MLM ones.
    shown = causal_run.repo.run("dvc", "metrics", "show", "--json")
    assert "causal.json" in shown and "kl_t1" in shown


def test_outputs_hold_what_the_report_says(causal_run) -> None:
    data = causal_run.repo.path / "data" / "causal"
    student = json.loads((data / "student_init" / "kd_student.json").read_text())
    assert student["kept_teacher_blocks"] == [1, 4] and student["layers"] == 2
    cache = json.loads((data / "cache" / "cache.json").read_text())
    assert cache["k"] == 8 and cache["rows"] == 24
    for arm in ("logit", "multi"):
        rows = pd.read_csv(data / "train" / arm / "train.csv")
        assert rows["step"].tolist() == [2, 4, 6]
        assert {"loss/logit", "grad_norm/layer_0", "grad_norm/layer_1"} <= set(rows.columns)
        assert len(pd.read_csv(data / "eval" / arm / "test.csv")) == 2  # 8 blocks / 4
    multi = pd.read_csv(data / "train" / "multi" / "train.csv")
    assert {"loss/hidden", "loss/attention", "loss/embedding", "grad_norm/projections"} <= set(
        multi.columns
    )
    report = (data / "report" / "report.md").read_text()
    assert "## Held-out scores" in report and "paired interval" in report
    assert report.count("| teacher |") == 3  # the score table and both prompts' continuations
    # The causal.scheme arm (logit) exported, its card naming the blocks it kept.
    assert (data / "distilled" / "model.safetensors").read_bytes() == (
        data / "train" / "logit" / "model.safetensors").read_bytes()
    card = yaml.safe_load((data / "distilled" / "README.md").read_text().split("---")[1])
    assert card["distillation"]["kept_teacher_blocks"] == [1, 4]


def test_every_causal_stage_declares_the_params_it_reads(causal_run) -> None:
    path = causal_run.repo.path
    raw = yaml.safe_load((path / "params.yaml").read_text())
    reads = read_traces(causal_run.traces)
    by_name = {s.name: s for s in stages(path)}
    assert set(CAUSAL) <= set(reads)
    missing = {n: undeclared_params(by_name[n], keys, raw) for n, keys in reads.items()}
    assert not {k: v for k, v in missing.items() if v}
    assert "causal.train.lr" in reads["causal_train@multi"]


@pytest.mark.long
def test_a_second_repro_reruns_nothing_and_an_arm_change_reruns_that_arm(causal_run,
                                                                        tmp_path) -> None:
    from conftest import TinyPipeline

    repo = TinyPipeline.clone(causal_run.repo.path, tmp_path / "clone")
    assert "Running stage" not in repo.run("dvc", "repro", "causal_report")
    out = repo.run("dvc", "exp", "run", "-S", "causal.schemes.logit.divergence=jsd",
                   "causal_report", timeout=600)  # fmt: skip
    assert _ran(out) == {"check_params", "causal_train@logit", "causal_evaluate@logit",
                         "causal_report"}
    shown = repo.run("dvc", "exp", "show", "--json")
    assert "causal.json" in shown
    # Another seed retrains and re-evaluates the arms; the teacher, its tokens, its cache and the
    # initial student's evaluation are reused (causal_student reruns, as it reads base.seed for
    # a config student, but a layer-subset student is the same for every seed, so nothing below
    # it reruns for that).
    out = repo.run("dvc", "exp", "run", "-S", "base.seed=7", "causal_report", timeout=600)
    assert _ran(out) == {"check_params", "causal_student", "causal_train@logit",
                         "causal_train@multi", "causal_evaluate@logit", "causal_evaluate@multi",
                         "causal_report"}  # fmt: skip


@pytest.mark.long
def test_the_mlm_family_leaves_notes_in_seconds(causal_run, tmp_path) -> None:
    from conftest import TinyPipeline

    repo = TinyPipeline.clone(causal_run.repo.path, tmp_path / "clone")
    out = repo.run("dvc", "exp", "run", "-S", "model.family=mlm", "causal_report", timeout=600)
    assert set(CAUSAL) <= _ran(out)
    data = repo.path / "data" / "causal"
    note = json.loads((data / "train" / "logit" / "note.json").read_text())
    assert note["family"] == "mlm" and "model.family=causal" in note["note"]
    assert "kl_t1" not in (repo.path / "data/metrics/causal.json").read_text()
