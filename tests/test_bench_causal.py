"""The causal step benchmark (python -m kd.bench.causal) runs every row and compares like with like."""

from __future__ import annotations

import json

import pytest

from kd.bench import causal


@pytest.mark.slow
def test_causal_benchmark_rows_agree(tmp_path) -> None:
    out = tmp_path / "causal.json"
    argv = ["--layers", "4", "--student-layers", "2", "--batch-size", "2", "--seq-len", "8",
            "--steps", "1", "--out", str(out)]  # fmt: skip
    assert causal.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["arm"], r["way"]): r for r in result["rows"]}
    assert set(rows) == {("logit", "naive"), ("logit", "project"), ("logit", "project+cache"),
                         ("multi", "naive"), ("multi", "project")}  # fmt: skip
    # The same student, teacher and batch: the logit and attention terms agree across ways (the
    # cached row's logit term is the top-k lower bound, so it is only bounded).
    for arm in ("logit", "multi"):
        naive, ours = (
            rows[arm, "naive"]["first_batch_terms"],
            rows[arm, "project"]["first_batch_terms"],
        )
        assert ours["logit"] == pytest.approx(naive["logit"], rel=1e-5)
    multi = (
        rows["multi", "naive"]["first_batch_terms"],
        rows["multi", "project"]["first_batch_terms"],
    )
    assert multi[1]["attention"] == pytest.approx(multi[0]["attention"], rel=1e-5)
    assert (
        rows["logit", "project+cache"]["first_batch_terms"]["logit"]
        <= rows["logit", "naive"]["first_batch_terms"]["logit"]
    )
    for r in rows.values():
        assert r["step_s"] > 0 and 0 < r["mfu"] < 1 and r["model_gflop"] > 0
    # No teacher in the cached step: fewer FLOPs.
    assert rows["logit", "project+cache"]["model_gflop"] < rows["logit", "project"]["model_gflop"]
