"""The DAG is a contract: every change reruns what it affects, every result is versioned, and a
second `dvc repro` reproduces the lock (see also tests/test_pipeline.py, which compares a fresh
copy's dvc.lock byte for byte).

    python -m pytest tests/test_dag_contract.py              # all of it (the slow part: ~4 min)
    python -m pytest tests/test_dag_contract.py -m "not slow" # the static checks, seconds

The static checks read this repository's dvc.yaml and code (tests/dagcheck.py); the slow ones
run the tiny pipeline (tests/conftest.py) and then what a DVC user does with it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, GitDvcRepo, copy_project, repo_env
from dagcheck import (
    Stage,
    closure,
    entry_modules,
    read_traces,
    stages,
    undeclared_code,
    undeclared_params,
)

from kd.core import params as kd_params
from kd.core.tracking import flatten
from kd.report import seeds


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


# --- code: every file a stage executes is one of its deps --------------------------------------


def test_every_stage_depends_on_every_project_file_it_executes() -> None:
    found = stages(REPO)
    # Both pipelines: dvc.yaml and the causal study's causal/dvc.yaml.
    assert {"check_params", "pin_inputs", "train@multi", "evaluate_init", "report",
            "causal_check_params", "causal_train@multi", "causal_report"} <= {s.name for s in found}
    missing = {s.name: undeclared_code(REPO, s) for s in found}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, "stages that execute files dvc.yaml does not list as deps:\n" + "\n".join(
        f"  {name}: {', '.join(files)} (add them, or the kd/ folder that holds them, to its deps)"
        for name, files in missing.items()
    )


def _planned(target: str) -> set[str]:
    """The stages `dvc repro <target>` would run in a repository where none has run yet (DVC's
    own plan: the target's stages and everything upstream of them)."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with Repo(str(REPO)) as repo:
        stages_ = collect_stages(repo, [target])
        return {s.addressing for s in plan_repro(get_active_graph(repo.index.graph), stages_)}


def test_the_default_repro_runs_no_causal_stage_and_the_causal_one_only_the_corpus() -> None:
    """`dvc repro` is dvc.yaml's (DVC's default target): no causal stage. `dvc repro
    causal/dvc.yaml` runs the causal stages and, of dvc.yaml, only what the shared corpus needs."""
    default = _planned("dvc.yaml")  # what `dvc repro` with no target plans
    assert {"train@multi", "report", "plots", "quantize"} <= default
    assert not {s for s in default if "causal" in s}
    causal = _planned("causal/dvc.yaml")
    assert {s for s in causal if not s.startswith("causal/dvc.yaml:")} == {
        "check_params", "pin_inputs", "sample_corpus"}
    assert {"causal/dvc.yaml:causal_check_params", "causal/dvc.yaml:causal_train@multi",
            "causal/dvc.yaml:causal_plots"} <= causal


def test_closure_follows_imports_inside_functions_and_launchers() -> None:
    train = closure(REPO, entry_modules("python -m kd.training.launch stages.train --arm x"))
    # launch runs the stage module; the loop imports the distiller, which imports the layer map.
    assert {"kd/training/launch.py", "stages/train.py", "kd/distill/layermap.py",
            "kd/data/masking.py", "kd/core/params.py"} <= train
    # kd/bench imports kd.models.student inside a function: that counts too.
    assert "kd/models/student.py" in closure(REPO, ["kd.bench.bench"])
    # A package marker with only a docstring executes nothing.
    assert "kd/__init__.py" not in train and "stages/__init__.py" not in train


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """This project's DAG and code in a DVC repository of its own, to be broken on purpose."""
    path = tmp_path / "project"
    path.mkdir()
    copy_project(path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=path, check=True)
    return path


def test_the_code_check_names_an_undeclared_import(project_copy) -> None:
    """The test of the test: an import added to a stage, or a dep taken away, fails it."""
    stage = project_copy / "stages" / "sample_corpus.py"
    stage.write_text(stage.read_text().replace(
        "def main() -> None:\n",
        "def main() -> None:\n    from kd.training import interrupt  # noqa: F401\n",
    ))
    dvc_yaml = project_copy / "dvc.yaml"
    raw = yaml.safe_load(dvc_yaml.read_text())
    raw["stages"]["evaluate"]["do"]["deps"].remove("kd/evaluation")
    dvc_yaml.write_text(yaml.safe_dump(raw, sort_keys=False))

    missing = {s.name: undeclared_code(project_copy, s) for s in stages(project_copy)}
    assert missing["sample_corpus"] == ["kd/training/interrupt.py"]
    assert missing["evaluate@multi"] == ["kd/evaluation/evaluate.py", "kd/evaluation/lstsq.py"]
    assert missing["evaluate@logit"] == missing["evaluate@multi"]
    assert not missing["tokenize"]


# --- params: every key a stage reads is declared -----------------------------------------------


def test_the_params_check_names_an_undeclared_read() -> None:
    """The test of the test, in one process: keys read from validated params are recorded, and
    a read the stage's `params:` does not cover is named."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    trace = kd_params.start_trace()
    try:
        p = kd_params.parse_params(raw)
        read = [
            p.train.lr,
            p.loss.schemes["multi"].active_terms,  # a property: reads terms, weight_schedules
            p.student.model_dump(),  # a whole section
            p.paths.corpus,
            p.paths.checkpoints,
        ]
    finally:
        kd_params.stop_trace()
    assert {"train.lr", "loss.schemes.multi.terms", "loss.schemes.multi.weight_schedules",
            "student", "paths.corpus", "paths.checkpoints"} <= trace.keys
    assert "loss.schemes.logit.terms" not in trace.keys and read  # only what was read
    stage = Stage("x", "python -m stages.x", deps=["data/corpus"],
                  params=["train", "loss.schemes.multi"])
    assert undeclared_params(stage, trace.keys, raw) == ["student"]
    # A path read is declared when the path is a dep or an out (dvc.yaml's ${paths.*}).
    stage.deps = []
    assert undeclared_params(stage, trace.keys, raw) == ["paths.corpus", "student"]


@pytest.mark.slow
def test_every_stage_declares_every_params_key_it_reads(tiny_pipeline) -> None:
    repo = tiny_pipeline.repo
    raw = yaml.safe_load((repo.path / "params.yaml").read_text())
    reads = read_traces(tiny_pipeline.params_traces)
    by_name = {s.name: s for s in stages(repo.path)}
    ran = _ran(tiny_pipeline.repro_out) - {"pin_inputs"}  # it reads no params at all
    assert ran <= set(reads), f"stages that left no trace: {sorted(ran - set(reads))}"
    missing = {name: undeclared_params(by_name[name], keys, raw) for name, keys in reads.items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, "stages that read params dvc.yaml does not declare:\n" + "\n".join(
        f"  {name}: {', '.join(keys)}" for name, keys in missing.items()
    )
    # The traces are real: training read its learning rate, the report its arms.
    assert "train.lr" in reads["train@multi"] and "loss.arms" in reads["report"]


# --- a change reruns what it affects ----------------------------------------------------------


def _status(repo: GitDvcRepo) -> set[str]:
    out = repo.run("dvc", "status", "dvc.yaml", "--json")  # the tiny repo ran the MLM one only
    return set(json.loads(out[out.index("{"):]) if "{" in out else {})


@pytest.mark.slow
@pytest.mark.long
def test_editing_one_byte_of_a_module_makes_dvc_status_list_its_stages(tiny_pipeline, tmp_path):
    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    assert _status(repo) == set()
    found = stages(repo.path)
    # One module of every layer the MLM stages execute (the gate's included), and a stage script;
    # tests/test_causal_pipeline.py does the same for the causal family's modules.
    for module in ("kd/core/runtime.py", "kd/data/masking.py", "kd/models/student.py",
                   "kd/distill/layermap.py", "kd/training/interrupt.py", "kd/evaluation/lstsq.py",
                   "kd/probe/probe.py", "kd/report/report.py", "kd/quantize/dynamic.py",
                   "kd/preflight/host.py", "kd/inputs.py", "stages/report.py"):
        path = repo.path / module
        before = path.read_bytes()
        path.write_bytes(before + b"#")
        try:
            listed = _status(repo)
        finally:
            path.write_bytes(before)
        executing = {s.name for s in found
                     if module in closure(repo.path, entry_modules(s.cmd))}
        assert executing, module
        assert executing <= listed, (module, sorted(executing - listed))
    assert _status(repo) == set()


def test_the_committed_locks_are_as_dvc_writes_them() -> None:
    """DVC rewrites a lock entry whenever it runs or commits its stage, with its own YAML writer
    (ruamel, 80 columns: a long string is folded). A committed lock in any other layout (a
    hand edit, another writer) makes a fresh clone's `dvc repro` dirty `git status` although
    every hash is equal, so each lock must be a fixed point of that writer."""
    from dvc.utils.serialize import dumps_yaml

    locks = [p for p in (REPO / "dvc.lock", REPO / "causal" / "dvc.lock") if p.exists()]
    assert REPO / "dvc.lock" in locks
    for lock in locks:
        text = lock.read_text()
        assert dumps_yaml(yaml.safe_load(text)) == text, (
            f"{lock.relative_to(REPO)} is not laid out as DVC writes it: rewrite it with "
            "`python -c \"import yaml, sys; from dvc.utils.serialize import dumps_yaml; "
            "p = sys.argv[1]; open(p, 'w').write(dumps_yaml(yaml.safe_load(open(p))))\" "
            f"{lock.relative_to(REPO)}` (the hashes stay as they are)")


# --- results are versioned ----------------------------------------------------------------------


def test_each_lock_has_an_entry_for_every_stage_of_its_pipeline_and_no_other() -> None:
    """A clone's plain `dvc pull` checks out every pipeline's outputs only if each committed
    lock holds every stage's hashes (DVC stops with "No file hash info found" on the first
    stage that has none); an entry for a stage that is gone (a renamed or removed stage) is
    dead weight that `dvc repro` never rewrites."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = {}
        for stage in repo.index.stages:
            stages.setdefault(Path(stage.path), set()).add(stage.name)
    assert set(stages) == {REPO / "dvc.yaml", REPO / "causal" / "dvc.yaml"}, stages
    for yaml_path, names in stages.items():
        lock = yaml_path.with_suffix(".lock")
        rel = lock.relative_to(REPO)
        assert lock.is_file(), f"{rel} is not committed: run `dvc repro {yaml_path.relative_to(REPO)}`"
        locked = set(yaml.safe_load(lock.read_text())["stages"])
        assert not names - locked, f"{rel} has no entry for {sorted(names - locked)}: run them"
        assert not locked - names, f"{rel} names stages {sorted(locked - names)} that are gone"


@pytest.mark.slow
@pytest.mark.long
def test_a_clone_pulls_from_a_remote_and_reruns_nothing(tiny_pipeline, tmp_path) -> None:
    # The tiny repository never ran the causal pipeline (its own tests do that), so the round
    # trip is of the MLM pipeline: `dvc pull dvc.yaml`. In this repository both locks are
    # committed whole (the test above), so a plain `dvc pull` brings both.
    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    remote = tmp_path / "remote"
    repo.run("dvc", "remote", "add", "-d", "store", str(remote))
    repo.commit("a DVC remote")
    repo.run("dvc", "push")

    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(repo.path), str(fresh)], check=True)
    clone = GitDvcRepo(fresh, repo_env(fresh))
    # What git alone brings: the small results, committed with the lock.
    for small in ("data/metrics/eval.json", "data/train/multi.csv", "data/eval/logit.json",
                  "data/probe/teacher.json", "data/inputs.json", "data/params.ok"):
        assert (fresh / small).is_file(), small
    clone.run("dvc", "pull", "dvc.yaml")
    status = clone.run("dvc", "status", "dvc.yaml")
    assert "Data and pipelines are up to date." in status, status
    out = clone.run("dvc", "repro")
    assert _ran(out) == set(), out
    assert clone.run("git", "status", "--porcelain").strip() == ""  # no byte of the lock moved
    assert (fresh / "data" / "students" / "multi" / "model.safetensors").read_bytes() == (
        repo.path / "data" / "students" / "multi" / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.long
def test_queued_experiments_carry_their_metrics_and_commits_diff(tiny_pipeline, tmp_path) -> None:
    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    # The cheapest experiment with other numbers: the logit arm as the headline (no training;
    # the default run's seed experiment, `-S base.seed=1`, is the same mechanism at length).
    repo.run("dvc", "exp", "run", "--queue", "-S", "loss.scheme=logit", "-n", "logit-head")
    status = repo.run_queue()
    assert "Success" in status, status

    rows = {r.label: r.metrics for r in seeds.parse_rows(seeds.exp_show(repo.path))}
    assert rows.get("logit-head"), f"the queued experiment shows no eval.json: {rows}"
    assert rows["logit-head"]["scheme"] == "logit" and rows["workspace"]["scheme"] == "multi"
    assert rows["logit-head"]["test/logit_kl_t1"] != rows["workspace"]["test/logit_kl_t1"]
    # `dvc exp show` is read at a glance: the headline metrics are a handful of columns.
    flat = flatten(rows["logit-head"])
    assert len(flat) < 25, sorted(flat)
    header = repo.run("dvc", "exp", "show", "--csv", "--only-changed").splitlines()[0]
    assert len(header.split(",")) < 100, header

    repo.run("dvc", "exp", "apply", "logit-head")
    repo.commit("the logit arm as the headline")
    diff = repo.run("dvc", "metrics", "diff", "HEAD~1")
    assert "data/metrics/eval.json" in diff and "test/logit_kl_t1" in diff, diff
