"""kd.report.seeds: the statistics on hand-computed cases, the verdicts, which `dvc exp show` rows count,
and the command end to end on a real `dvc exp show --json` (tests/data/dvc_exp_show.json).

The fixture came from a throwaway git + DVC repo whose one stage writes an eval.json holding the
per-arm keys that kd.report.report now writes to comparison.json (arms logit and multi, plus a
probe key): the workspace and its commit at seed 0, queued seeds 1 and 2, seed 1 queued twice,
seed 3 with another train.lr, seed 13 failing (DVC lists it with its baseline's metrics), and
seed 9 still queued. Tests on it take each row's comparison from its listed metrics; reading it
from each experiment's own commit is tested on a real repository.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from kd.report import seeds
from kd.report.seeds import Row

FIXTURE = Path(__file__).parent / "data" / "dvc_exp_show.json"
T_975_2 = 4.302652729749462  # t_{0.975, 2}, from tables


def row(rev, seed, metrics=None, ts=None, **params) -> Row:
    p = {"base.seed": seed, "train.lr": 5e-4, **params}
    m = {"arms/logit/train/logit_kl_t1": 1.0} if metrics is None else metrics
    return Row(rev, None if rev == "workspace" else rev, ts, None, None, p, m, m)


def fixture_rows() -> list[Row]:
    """The fixture's rows, each with its listed metrics as its comparison (module docstring)."""
    return [replace(r, comparison=r.metrics) for r in seeds.parse_rows(json.loads(
        FIXTURE.read_text()))]


# --- statistics ------------------------------------------------------------------------------


def test_summarize_known_values():
    s = seeds.summarize([1, 2, 3])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2) and s["sd"] == pytest.approx(1)
    assert s["half_width"] == pytest.approx(T_975_2 / math.sqrt(3))  # 2.484
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)


def test_summarize_drops_missing_and_has_no_interval_for_one_value():
    assert seeds.summarize([None, float("nan"), 3.0, True]) == {
        "n": 1,
        "mean": 3.0,
        "sd": None,
        "half_width": None,
        "ci_low": None,
        "ci_high": None,
    }


def test_paired_difference_against_the_formula():
    # d = [1, 2, 2, 1]: mean 1.5, sd √(1/3), t = 1.5 / (sd/√4) = 3√3 with 3 degrees of freedom.
    # Student's t with 3 df has a closed-form CDF: two-sided p = 1 - (2/π)(u/(1+u²) + atan u),
    # u = t/√3 = 3.
    d = seeds.paired([1, 2, 3, 4], [2, 4, 5, 5])
    assert d["diffs"] == [1, 2, 2, 1]
    assert d["mean"] == pytest.approx(1.5) and d["sd"] == pytest.approx(math.sqrt(1 / 3))
    assert d["t"] == pytest.approx(3 * math.sqrt(3))
    assert d["p"] == pytest.approx(1 - 2 / math.pi * (3 / 10 + math.atan(3)))  # 0.013847
    assert d["half_width"] == pytest.approx(3.182446305 * math.sqrt(1 / 3) / 2)  # t_{0.975,3}, tables


def test_paired_skips_seeds_missing_either_value():
    d = seeds.paired([1.0, None, 3.0], [2.0, 5.0, 5.0])
    assert d["n"] == 2 and d["diffs"] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("low", "high", "lower", "expected"),
    [
        (-0.3, -0.1, True, "holds"),
        (0.1, 0.3, True, "reversed"),
        (-0.1, 0.3, True, "not distinguishable"),
        (0.1, 0.3, False, "holds"),
        (-0.3, -0.1, False, "reversed"),
        (-0.1, 0.3, False, "not distinguishable"),
        (0.0, 0.3, False, "not distinguishable"),  # touching 0 is not "entirely above"
        (None, None, True, "not distinguishable"),  # one seed: no interval
    ],
)
def test_verdict(low, high, lower, expected):
    assert seeds.verdict(low, high, lower) == expected


# --- rows of `dvc exp show --json` ---------------------------------------------------------------


def test_parse_rows_walks_the_real_tree():
    rows = seeds.parse_rows(json.loads(FIXTURE.read_text()))
    got = {(r.label, r.seed) for r in rows}
    assert got == {
        ("workspace", 0),
        ("master", 0),
        ("ratty-oner", 1),
        ("ratty-pall", 1),
        ("gauzy-doll", 2),
        ("dried-lieu", 3),
        ("quits-uvea", 9),
        ("spumy-tuts", 13),
    }
    by = {r.label: r for r in rows}
    assert by["spumy-tuts"].error == "Experiment run failed" and by["spumy-tuts"].state == "failed"
    assert by["quits-uvea"].state == "queued" and by["quits-uvea"].metrics is None
    assert by["workspace"].params["loss.schemes.logit.terms.logit"] == 1.0
    assert by["gauzy-doll"].metrics["arms/multi/mean_grad_norm"] == 0.1091


def test_select_on_the_real_tree():
    sel = seeds.select(fixture_rows())
    assert [(r.label, r.seed) for r in sel.rows] == [
        ("workspace", 0),  # over its identical commit
        ("ratty-oner", 1),  # the newer of two identical runs
        ("gauzy-doll", 2),
    ]
    notes = "\n".join(sel.notes)
    assert "dried-lieu (seed 3): params differ beyond base.seed: train.lr=0.001" in notes
    assert "spumy-tuts (seed 13): failed" in notes  # its stale metrics are never read
    assert "quits-uvea (seed 9): queued" in notes
    assert "kept the workspace's (workspace), skipped master" in notes
    assert "kept the newest (ratty-oner), skipped ratty-pall" in notes


def test_many_rows_skipped_for_one_reason_make_one_note():
    # `--all-commits` lists every older commit, each without the metrics file: one line says so.
    old = [row(f"c{i:02d}", i + 10, metrics={}) for i in range(12)]
    sel = seeds.select([row("workspace", 0), row("aaa", 1), *old])
    skipped = [n for n in sel.notes if "no eval.json" in n]
    assert skipped == ["skipped 12 rows (c00, c01, c02 and 9 more): no eval.json in its "
                       "metrics (not run?)"]  # fmt: skip


def test_select_skips_other_params_and_keeps_one_row_per_seed():
    rows = [
        row("workspace", 0),
        row("aaa", 1, ts="2026-01-01T00:00:00"),
        row("bbb", 1, ts="2026-01-02T00:00:00"),
        row("ccc", 2, **{"loss.arms": ["logit"]}),  # a key the workspace does not have
        row("ddd", 3, **{"train.lr": 1e-3}),
        row("eee", 4, metrics={}),  # an empty metrics dict counts as none
        replace(row("fff", 5), comparison=None),  # its commit holds no comparison.json
    ]
    sel = seeds.select(rows)
    assert [r.label for r in sel.rows] == ["workspace", "bbb"]
    notes = "\n".join(sel.notes)
    assert "ccc (seed 2): params differ beyond base.seed: loss.arms=['logit']" in notes
    assert "ddd (seed 3): params differ beyond base.seed: train.lr=0.001" in notes
    assert "eee (seed 4): no eval.json" in notes
    assert "fff (seed 5): its commit holds no data/metrics/comparison.json" in notes
    assert "kept the newest (bbb), skipped aaa" in notes


def test_too_few_seeds_names_the_command_to_queue_more():
    with pytest.raises(SystemExit, match=r"1 seed\(s\).*dvc exp run --queue -S 'base.seed=1,2'"):
        seeds.select([row("workspace", 0), row("abc1234", 0), row("x", 5, **{"train.lr": 1.0})])


# --- pairs -----------------------------------------------------------------------------------


def test_pairs_come_from_the_schemes_terms_or_the_arm_name():
    params = {
        "loss.schemes.kd.terms.logit": 1.0,
        "loss.schemes.kd.terms.hidden": 0.0,  # a zero weight is no term
        "loss.schemes.tiny.terms.logit": 1.0,
        "loss.schemes.tiny.terms.hidden": 1.0,
    }
    assert seeds.arm_pairs(["kd", "tiny", "minilm"], params) == [("kd", "tiny"), ("kd", "minilm")]
    assert seeds.arm_pairs(["logit", "multi"], {}) == [("logit", "multi")]


# --- the command -----------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(seeds, "comparison_at", lambda row, root, family=None: row.metrics)
    out = tmp_path / "seeds"
    result = seeds.main(["--json", str(FIXTURE), "--out", str(out), "--no-mlflow"])
    saved = json.loads((out / "seeds.json").read_text())
    md = (out / "seeds.md").read_text()
    printed = capsys.readouterr().out

    assert saved["seeds"] == [0, 1, 2] == result["seeds"]
    assert [r["label"] for r in saved["runs"]] == ["workspace", "ratty-oner", "gauzy-doll"]
    logit = saved["arms"]["logit"]["train/logit_kl_t1"]
    assert logit["values"] == [2.6138, 2.5854, 2.6182]
    assert logit["mean"] == pytest.approx((2.6138 + 2.5854 + 2.6182) / 3)
    assert set(saved["arms"]["multi"]) == {*seeds.HEADLINE, "probe_linear_acc"}

    pair = saved["pairs"]["multi_vs_logit"]
    assert pair["metrics"]["mean_grad_norm"]["diffs"] == pytest.approx(
        [0.1088 - 0.0556, 0.1033 - 0.0556, 0.1091 - 0.0538]
    )
    verdicts = {k: c["verdict"] for k, c in pair["claims"].items()}
    assert verdicts == {
        "train/logit_kl_t1": "reversed",  # multi's is higher on every seed
        "test/logit_kl_t1": "reversed",
        "mean_grad_norm": "holds",
    }
    # The row worked out from the three differences, not copied from a run: mean ± t_{0.975,2}·sd/√3,
    # and the paired t-test's two-sided p from the closed-form CDF of Student's t with 2 degrees
    # of freedom, F(t) = 1/2 + t / (2√(2 + t²)), so p = 1 − t/√(2 + t²).
    d = [0.1088 - 0.0556, 0.1033 - 0.0556, 0.1091 - 0.0538]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = T_975_2 * sd / math.sqrt(3)
    t = mean / (sd / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t**2)
    got = pair["metrics"]["mean_grad_norm"]
    assert (got["mean"], got["sd"], got["half_width"]) == pytest.approx((mean, sd, half), rel=1e-9)
    assert (got["t"], got["p"]) == pytest.approx((t, p), rel=1e-6)
    assert (mean, half, p) == pytest.approx((0.05207, 0.00975, 0.001889), rel=1e-3)  # by hand
    assert f"| mean_grad_norm | {mean:.4g} ± {half:.4g} | {p:.4g} | 3 | higher | **holds** |" in md
    assert "multi has a lower train logit loss than logit: **reversed**" in md
    assert "skipped spumy-tuts (seed 13): failed" in md
    assert md in printed


def test_exp_show_runs_dvc_in_a_repo(git_dvc_repo):
    (git_dvc_repo.path / "params.yaml").write_text("base:\n  seed: 0\n")
    git_dvc_repo.commit("params")
    rows = seeds.parse_rows(seeds.exp_show(git_dvc_repo.path))
    assert [r.rev for r in rows][0] == "workspace"
    assert all(r.seed == 0 for r in rows)


_STAGE = """\
import json, os, yaml
seed = yaml.safe_load(open("params.yaml"))["base"]["seed"]
os.makedirs("data/metrics", exist_ok=True)
json.dump({"scheme": "multi", "test/logit_kl_t1": 2.0 + seed},
          open("data/metrics/eval.json", "w"))
json.dump({"arms/logit/test/logit_kl_t1": 1.0 + seed, "arms/multi/test/logit_kl_t1": 2.0 + seed},
          open("data/metrics/comparison.json", "w"))
"""

_DVC_YAML = """\
stages:
  report:
    cmd: python report.py
    deps: [report.py]
    params: [base.seed]
    outs:
      - data/metrics/comparison.json:
          cache: false
    metrics:
      - data/metrics/eval.json:
          cache: false
"""


@pytest.mark.slow
@pytest.mark.long
def test_each_experiment_is_read_from_its_own_commit(git_dvc_repo) -> None:
    """The small results are committed with each experiment: a queued one's comparison.json
    is read from its own commit, with no MLflow detour."""
    repo = git_dvc_repo
    (repo.path / "params.yaml").write_text("base:\n  seed: 0\n")
    (repo.path / "dvc.yaml").write_text(_DVC_YAML)
    (repo.path / "report.py").write_text(_STAGE)
    repo.commit("init")
    repo.run("dvc", "repro")
    repo.commit("seed 0")
    repo.run("dvc", "exp", "run", "--queue", "-S", "base.seed=1", "-n", "seed-one")
    assert "Success" in repo.run_queue(deadline_s=240)
    rows = seeds.with_comparisons(seeds.parse_rows(seeds.exp_show(repo.path)), repo.path)
    by_seed = {(r.label, r.seed): r for r in rows if r.comparison}
    assert by_seed[("workspace", 0)].comparison["arms/logit/test/logit_kl_t1"] == 1.0
    assert by_seed[("seed-one", 1)].comparison["arms/logit/test/logit_kl_t1"] == 2.0
    assert by_seed[("seed-one", 1)].metrics["test/logit_kl_t1"] == 3.0
    selected = seeds.select(rows)
    assert [r.seed for r in selected.rows] == [0, 1]


# --- the causal family -------------------------------------------------------------------------


def causal_row(rev, seed, kl, grad, made=None, **params) -> Row:
    """A row whose data/metrics/causal.json holds the given held-out KL and gradient norms,
    made with base.seed ``made`` (default: the row's own seed)."""
    p = {"base.seed": seed, "causal.schemes.logit.terms.logit": 1.0,
         "causal.schemes.multi.terms.logit": 1.0, "causal.schemes.multi.terms.hidden": 1.0,
         "causal.arms": ["logit", "multi"], **params}  # fmt: skip
    content = {"teacher": {"perplexity": 19.0},
               "student_init": {"kl_t1": 11.0, "perplexity": 9e5},
               "logit": {"kl_t1": kl[0], "mean_grad_norm": grad[0], "train_logit_loss": kl[0]},
               "multi": {"kl_t1": kl[1], "mean_grad_norm": grad[1], "train_logit_loss": kl[1]},
               "seed": seed if made is None else made}
    flat = seeds.CAUSAL.flat(content)
    return Row(rev, None if rev == "workspace" else rev, None, None, None, p, content, flat)


def test_the_causal_family_pairs_the_causal_arms_over_seeds() -> None:
    rows = [
        causal_row("workspace", 0, (8.0, 8.5), (1.0, 3.0)),
        causal_row("s0", 0, (8.0, 8.5), (1.0, 3.0)),  # committed and applied: the workspace's run
        causal_row("s1", 1, (8.1, 8.7), (1.1, 3.2)),
        causal_row("s2", 2, (7.9, 8.4), (0.9, 2.9)),
        causal_row("x", 3, (1, 1), (1, 1), **{"causal.top_k": 0}),  # another experiment
        # An MLM seed experiment (`dvc exp run -S base.seed=4`): its causal.json is seed 0's.
        causal_row("m4", 4, (8.0, 8.5), (1.0, 3.0), made=0),
    ]
    sel = seeds.select(rows, family=seeds.CAUSAL)
    assert [r.label for r in sel.rows] == ["workspace", "s1", "s2"]
    assert any("m4" in n and "base.seed=0" in n and "did not run" in n for n in sel.notes)
    assert any("causal.top_k" in n for n in sel.notes)
    result = seeds.aggregate(sel, family=seeds.CAUSAL)
    assert list(result["arms"]) == ["logit", "multi"]  # neither the teacher nor the floor
    pair = result["pairs"]["multi_vs_logit"]
    # multi − logit per seed: 8.5 − 8.0, 8.7 − 8.1, 8.4 − 7.9
    assert pair["metrics"]["kl_t1"]["diffs"] == pytest.approx([0.5, 0.6, 0.5])
    assert pair["metrics"]["kl_t1"]["mean"] == pytest.approx(1.6 / 3)
    assert pair["claims"]["kl_t1"]["verdict"] == seeds.REVERSED
    assert pair["claims"]["mean_grad_norm"]["verdict"] == seeds.HOLDS
    assert "# The causal experiment over 3 seeds" in seeds.markdown(result)
    assert "dvc exp run --queue causal/dvc.yaml -S" in seeds.CAUSAL.queue_hint
