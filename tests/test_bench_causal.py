"""The causal step benchmark (python -m kd.bench.causal) runs every row and compares like with like."""

from __future__ import annotations

import json

import pytest

from kd.bench import causal


@pytest.mark.slow
@pytest.mark.long  # every row of the benchmark, TRL's included: half a minute
def test_causal_benchmark_rows_agree(tmp_path) -> None:
    out = tmp_path / "causal.json"
    argv = ["--layers", "4", "--student-layers", "2", "--batch-size", "2", "--seq-len", "8",
            "--steps", "1", "--out", str(out)]  # fmt: skip
    assert causal.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["arm"], r["way"], r["precision"]): r for r in result["rows"]}
    low = result["precision"]  # the pipeline's: bf16 where this CPU makes it faster, else fp32
    expected = {("logit", "naive", "fp32"), ("logit", "trl", "fp32"), ("logit", "project", "fp32"),
                ("logit", "project+cache", low), ("multi", "naive", "fp32"),
                ("multi", "project", "fp32")}  # fmt: skip
    if low == "bf16":
        expected |= {("logit", "trl", "bf16"), ("logit", "project", "bf16"),
                     ("multi", "project", "bf16")}  # fmt: skip
    assert set(rows) == expected and result["skipped"] == []  # TRL is a dev dependency

    def term(arm, way, name, prec="fp32"):
        return rows[arm, way, prec]["first_batch_terms"][name]

    # The same student, teacher and batch: the logit and attention terms agree across ways,
    # TRL's chunked loss included (the cached row's logit term is the top-k lower bound, so it
    # is only bounded); the bf16 rows agree loosely.
    for arm, way in [("logit", "project"), ("logit", "trl"), ("multi", "project")]:
        assert term(arm, way, "logit") == pytest.approx(term(arm, "naive", "logit"), rel=1e-5)
        if low == "bf16":
            assert term(arm, way, "logit", "bf16") == pytest.approx(
                term(arm, "naive", "logit"), rel=2e-2
            )
    assert term("multi", "project", "attention") == pytest.approx(
        term("multi", "naive", "attention"), rel=1e-5
    )
    assert term("logit", "project+cache", "logit", low) <= term("logit", "naive", "logit")
    for r in rows.values():
        assert r["step_s"] > 0 and 0 < r["mfu"] < 1 and r["model_gflop"] > 0
    # No teacher in the cached step: fewer FLOPs.
    assert (
        rows["logit", "project+cache", low]["model_gflop"]
        < rows["logit", "project", "fp32"]["model_gflop"]
    )


def test_trl_row_refuses_another_version(monkeypatch) -> None:
    # The TRL row calls a private function of one TRL release; another release is not timed as
    # if it were the same code: the benchmark records why and leaves the row out.
    import trl

    assert causal.trl_missing() is None
    monkeypatch.setattr(trl, "__version__", "0.0.1")
    assert "found 0.0.1" in causal.trl_missing()
    with pytest.raises(RuntimeError, match="1.16.0"):
        causal.trl_terms(None, None, None, causal.SCHEMES["logit"])
