"""`dvc plots show` / `dvc plots diff` draw every arm the params list, and only those: the plots
stage stacks the arms' CSVs into one file per chart (kd/report/curves.py) and the charts colour
by arm (kd/report/arms.vega.json), so dvc.yaml names no arm. Checked on this project's dvc.yaml
with DVC itself, on CSVs written here (no pipeline run)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import yaml
from conftest import GitDvcRepo, project_repo

from kd.report import curves


def test_stack_tags_each_arm_and_keeps_every_column() -> None:
    a = pd.DataFrame({"step": [1, 2], "loss/total": [1.0, 0.5]})
    b = pd.DataFrame({"step": [1], "loss/total": [2.0], "loss/hidden": [0.3]})
    out = curves.stack({"logit": a, "multi": b})
    assert out.columns.tolist() == ["arm", "step", "loss/total", "loss/hidden"]
    assert out["arm"].tolist() == ["logit", "logit", "multi"]
    assert out["loss/hidden"].isna().tolist() == [True, True, False]


def _arms(repo: GitDvcRepo, arms: list[str]) -> None:
    raw = yaml.safe_load((repo.path / "params.yaml").read_text())
    raw["loss"]["arms"] = arms
    raw["loss"]["schemes"].setdefault("third", raw["loss"]["schemes"]["logit"])
    (repo.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.rmtree(repo.path / "data" / "plots", ignore_errors=True)  # as DVC does before a rerun
    repo.run("python", "-m", "stages.plots")


def _drawn(out: str) -> dict[str, set[tuple[str, str]]]:
    data = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]["data"]  # then a warning
    return {name: {(r["rev"], r["arm"]) for p in plots for r in p["content"]["data"]["values"]}
            for name, plots in data.items() if plots}  # fmt: skip


def test_a_third_arm_appears_and_a_removed_one_disappears(tmp_path) -> None:
    repo = project_repo(tmp_path / "repo")
    for folder in ("train", "eval"):
        (repo.path / "data" / folder).mkdir(parents=True)
    for arm, shift in (("logit", 0.0), ("multi", 1.0), ("third", 2.0)):
        steps = pd.DataFrame({"step": [2, 4], "tokens": [8, 16], "flops": [10, 20],
                              "loss/total": [3 + shift, 2 + shift],
                              "loss/logit": [3 + shift, 2 + shift], "grad_norm/global": [1, 1]})
        steps.to_csv(repo.path / "data" / "train" / f"{arm}.csv", index=False)
        for split in ("train", "test"):
            pd.DataFrame({"batch": [0, 1], "logit_kl_t1": [1 + shift, 1 + shift]}).to_csv(
                repo.path / "data" / "eval" / f"{arm}_{split}.csv", index=False)
    _arms(repo, ["logit", "multi", "third"])
    repo.commit("three arms")
    drawn = _drawn(repo.run("dvc", "plots", "show", "--json", check=False))
    assert {"total_loss", "grad_norm", "eval_test_logit_loss", "logit_loss_vs_flops"} <= set(drawn)
    assert all(d == {("workspace", a) for a in ("logit", "multi", "third")} for d in drawn.values())

    _arms(repo, ["logit", "multi"])
    drawn = _drawn(repo.run("dvc", "plots", "diff", "HEAD", "--json", check=False))
    assert drawn["total_loss"] == {("HEAD", "logit"), ("HEAD", "multi"), ("HEAD", "third"),
                                   ("workspace", "logit"), ("workspace", "multi")}
