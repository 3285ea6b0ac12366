"""The causal family as a user runs it: the pipeline causal/dvc.yaml, on a tiny random Llama
teacher (a local folder) and a word-level tokenizer, with DVC.

One `dvc repro causal/dvc.yaml` per module (minutes on 2 cores, so the module runs in the long
tier); the tests then read what it wrote, check the params each stage read against
causal/dvc.yaml, and change things as a user would with `dvc exp run causal/dvc.yaml`, or edit
one byte of a module.
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
from dagcheck import closure, entry_modules, read_traces, stages, undeclared_params
from tiny import tiny_llama, topic_folder, word_tokenizer

from kd.core.params import TRACE_ENV

# The whole module is long: its fixture is a whole causal `dvc repro` (minutes), which the
# long tier builds anyway for the rerun tests; the default run keeps tests/test_causal_*.py's
# unit tests of every stage's library.
pytestmark = [pytest.mark.slow, pytest.mark.long]

PIPELINE = "causal/dvc.yaml"
CAUSAL = [
    "causal_check_params", "causal_teacher", "causal_student", "causal_tokenize", "causal_cache", "causal_train@logit",
    "causal_train@multi", "causal_evaluate@logit", "causal_evaluate@multi",
    "causal_evaluate_init", "causal_report", "causal_plots",
]  # fmt: skip


def _ran(out: str) -> set[str]:
    """The stages DVC ran, the causal ones without their ``causal/dvc.yaml:`` prefix."""
    return {s.removeprefix(PIPELINE + ":") for s in re.findall(r"Running stage '([^']+)'", out)}


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
    out = repo.run("dvc", "repro", PIPELINE, timeout=900)
    del repo.env[TRACE_ENV]
    repo.commit("causal repro")
    return CausalRun(repo, out, traces)


def test_the_causal_stages_run_and_only_they(causal_run) -> None:
    ran = _ran(causal_run.out)
    # The corpus is shared with dvc.yaml: its stages ran first, and no other MLM stage.
    assert ran == {*CAUSAL, "check_params", "pin_inputs", "sample_corpus"}


def test_the_headline_metrics_are_finite_and_ordered(causal_run) -> None:
    path = causal_run.repo.path
    m = json.loads((path / "data/metrics/causal.json").read_text())
    assert set(m) == {"teacher", "student_init", "logit", "multi", "seed"} and m["seed"] == 0
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
    assert cache["identity"]["k"] == 8 and cache["rows"] == 24 and cache["ids_dtype"] == "uint8"
    for arm in ("logit", "multi"):
        rows = pd.read_csv(data / "train" / arm / "train.csv")
        assert rows["step"].tolist() == [2, 4, 6]
        assert {"loss/logit", "grad_norm/layer_0", "grad_norm/layer_1"} <= set(rows.columns)
        assert len(pd.read_csv(data / "eval" / arm / "test.csv")) == 2  # 8 blocks / 4
    multi = pd.read_csv(data / "train" / "multi" / "train.csv")
    assert {"loss/hidden", "loss/attention", "loss/embedding", "grad_norm/projections"} <= set(
        multi.columns
    )
    # Every arm's curves, git-tracked, for `dvc plots show` (kd/report/curves.py).
    curves = pd.read_csv(data / "plots" / "train.csv")
    assert curves["arm"].tolist() == ["logit"] * 3 + ["multi"] * 3
    assert set(pd.read_csv(data / "plots" / "test.csv")["arm"]) == {"logit", "multi"}
    assert "data/causal/plots/train.csv" in causal_run.repo.run("git", "ls-files", "data/causal")
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
    # DVC_STAGE (the trace's stage name) addresses a stage of causal/dvc.yaml with the file.
    reads = {k.removeprefix(PIPELINE + ":"): v for k, v in read_traces(causal_run.traces).items()}
    by_name = {s.name: s for s in stages(path)}
    assert set(CAUSAL) <= set(reads)
    missing = {n: undeclared_params(by_name[n], keys, raw) for n, keys in reads.items()}
    assert not {k: v for k, v in missing.items() if v}
    assert "causal.train.lr" in reads["causal_train@multi"]


def _status(repo: GitDvcRepo) -> set[str]:
    out = repo.run("dvc", "status", PIPELINE, "--json")
    listed = json.loads(out[out.index("{"):]) if "{" in out else {}
    return {s.removeprefix(PIPELINE + ":") for s in listed}


def test_a_clone_reruns_nothing_and_leaves_git_clean(causal_run, tmp_path) -> None:
    """A fresh clone (git alone, then the DVC cache) reproduces nothing and rewrites no byte:
    the committed locks are as DVC writes them."""
    import subprocess

    from conftest import repo_env

    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(causal_run.repo.path), str(fresh)], check=True)
    clone = GitDvcRepo(fresh, repo_env(fresh))
    clone.run("dvc", "cache", "dir", "--local", str(causal_run.repo.path / ".dvc" / "cache"))
    clone.run("dvc", "checkout", "--with-deps", PIPELINE)  # the MLM outputs never ran here
    assert _ran(clone.run("dvc", "repro", PIPELINE)) == set()
    assert clone.run("git", "status", "--porcelain").strip() == ""


def test_editing_one_byte_reruns_only_the_stages_that_execute_it(causal_run, tmp_path) -> None:
    """The deps are file by file: an edit to the training code lists the arms' training (and,
    through its outputs, what reads them), never the teacher, its tokens or its cache."""
    from conftest import TinyPipeline

    repo = TinyPipeline.clone(causal_run.repo.path, tmp_path / "clone")
    assert _status(repo) == set()
    found = [s for s in stages(repo.path) if s.name in CAUSAL]
    listed = {}
    for module in ("kd/causal/distiller.py", "kd/causal/batches.py", "kd/causal/evaluate.py",
                   "kd/causal/tokens.py", "kd/causal/cache.py", "kd/report/causal.py",
                   "kd/training/loop.py", "kd/preflight/causal.py", "stages/causal_report.py"):
        path = repo.path / module
        before = path.read_bytes()
        path.write_bytes(before + b"#")
        try:
            listed[module] = _status(repo)
        finally:
            path.write_bytes(before)
        executing = {s.name for s in found if module in closure(repo.path, entry_modules(s.cmd))}
        assert executing and executing <= listed[module], (module, sorted(executing - listed[module]))
    arms = {"causal_train@logit", "causal_train@multi"}
    assert listed["kd/causal/distiller.py"] == arms
    assert listed["kd/training/loop.py"] == arms
    assert listed["kd/causal/evaluate.py"] == {"causal_check_params", "causal_evaluate@logit",
                                               "causal_evaluate@multi", "causal_evaluate_init"}
    assert listed["kd/causal/tokens.py"] == {"causal_tokenize"}
    assert listed["kd/causal/cache.py"] == {"causal_cache", *arms}
    assert listed["kd/report/causal.py"] == {"causal_report"}
    assert _status(repo) == set()


def test_a_second_repro_reruns_nothing_and_an_arm_change_reruns_that_arm(causal_run,
                                                                        tmp_path) -> None:
    from conftest import TinyPipeline

    repo = TinyPipeline.clone(causal_run.repo.path, tmp_path / "clone")
    assert "Running stage" not in repo.run("dvc", "repro", PIPELINE)
    out = repo.run("dvc", "exp", "run", PIPELINE, "-S", "causal.schemes.logit.divergence=jsd",
                   timeout=600)  # fmt: skip
    assert _ran(out) == {"causal_check_params", "causal_train@logit", "causal_evaluate@logit",
                         "causal_report", "causal_plots"}
    shown = repo.run("dvc", "exp", "show", "--json")
    assert "causal.json" in shown
    # Another seed retrains and re-evaluates the arms; the teacher, its tokens, its cache and the
    # initial student's evaluation are reused (causal_student reruns, as it reads base.seed for
    # a config student, but a layer-subset student is the same for every seed, so nothing below
    # it reruns for that).
    out = repo.run("dvc", "exp", "run", PIPELINE, "-S", "base.seed=7", timeout=600)
    # check_params reads base.seed too (dvc.yaml's gate, upstream of the shared corpus).
    assert _ran(out) == {"check_params", "causal_check_params", "causal_student", "causal_train@logit",
                         "causal_train@multi", "causal_evaluate@logit", "causal_evaluate@multi",
                         "causal_report", "causal_plots"}  # fmt: skip
