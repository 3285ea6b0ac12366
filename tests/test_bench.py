"""The step benchmark: FLOP formulas by hand, an end-to-end quick run, the agreement check."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from kd.bench import bench
from kd.core.params import Scheme
from kd.training import flops

SCHEMES = {
    "logit": Scheme(terms={"logit": 1.0}),
    "multi": Scheme(terms={"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logit": 1.0}),
}
TINY = bench.BenchConfig(
    steps=1,
    warmup=1,
    n_batches=2,
    matmul_n=64,
    matmul_repeats=1,
    sweep_seq=(8, 16),
    sweep_batch=(2,),
    sweep_steps=1,
    sweep_warmup=0,
)


def tiny(hidden: int, layers: int, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(
        BertConfig(
            vocab_size=60,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=32,
        )
    )


def test_flops_of_a_hand_computed_toy_shape():
    # D=4, F=8, V=10, 1 layer; B=2, L=3 (T=6); head at P=2 positions.
    enc = flops.Encoder(layers=1, hidden=4, heads=2, intermediate=8, vocab=10)
    # QKVO 4·(2·6·4·4)=768; scores+mix 2·2·(2·3·3·4)=288; FFN 2·(2·6·4·8)=768.
    assert flops.layer_forward(enc, 2, 3) == 768 + 288 + 768
    # transform 2·2·4·4=64, decoder 2·2·4·10=160
    assert flops.head_forward(enc, 2) == 64 + 160
    assert flops.attention_scores(enc, 2, 3) == 2 * 2 * 3 * 3 * 4
    teacher = flops.Encoder(layers=2, hidden=6, heads=2, intermediate=12, vocab=10)
    got = flops.step_flops(
        teacher,
        enc,
        2,
        3,
        head_positions=2,
        projections=3,
        teacher_score_layers=1,
        student_score_layers=1,
    )
    t_fwd = 2 * (8 * 6 * 36 + 4 * 2 * 9 * 6 + 4 * 6 * 6 * 12)
    t_head = 2 * 2 * 6 * 6 + 2 * 2 * 6 * 10
    t_scores = 2 * 2 * 9 * 6
    s_side = 1824 + 224 + 144 + 3 * (2 * 6 * 6 * 4)
    assert got["teacher_forward"] == t_fwd
    assert got["student_backward"] == 2 * s_side
    assert got["total"] == t_fwd + t_head + t_scores + 3 * s_side
    # No logit term: no head on either side.
    no_head = flops.step_flops(teacher, enc, 2, 3, head_positions=None)
    assert no_head["teacher_head"] == no_head["student_head"] == 0


def test_quick_benchmark_end_to_end_writes_json_and_plot(tmp_path):
    teacher, student = tiny(24, 4, seed=1), tiny(16, 2, seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = tmp_path / "bench" / "bench.json"
    res = bench.run_benchmark(
        teacher, student, bench.Shape(2, 16), SCHEMES, TINY, out=out, log=lambda s: None
    )
    saved = json.loads(out.read_text())
    assert set(saved) >= {
        "machine",
        "config",
        "models",
        "peak_gflops",
        "textbrewer",
        "arms",
        "agreement_ok",
        "scaling",
        "scaling_plot",
    }
    assert (out.parent / saved["scaling_plot"]).stat().st_size > 0
    assert saved["peak_gflops"]["fp32"] > 0
    assert saved["textbrewer"]["status"] == "ok", saved["textbrewer"]
    for arm in SCHEMES:
        rows = saved["arms"][arm]["rows"]
        assert set(rows) == set(bench.ROWS)
        for name in ("naive", "project_fp32"):
            r = rows[name]
            assert r["status"] == "ok", r
            for key in (
                "step_s",
                "sequences_per_s",
                "tokens_per_s",
                "peak_rss_mib",
                "flops_per_step",
                "achieved_gflops",
                "mfu",
                "terms",
            ):
                assert key in r
            assert r["agreement"]["ok"], r["agreement"]
        # docs/performance.md's "× TextBrewer" ratios need this row to run (textbrewer is a dev
        # dependency), to compute the same loss terms as the others, and to do the naive row's
        # work (its logit term over the full vocabulary at every position).
        tb = rows["textbrewer"]
        assert tb["status"] == "ok", tb
        assert tb["agreement"]["ok"], tb["agreement"]
        assert tb["flops_per_step"] == rows["naive"]["flops_per_step"]
        assert tb["step_s"] > 0 and tb["speedup_vs_naive"] > 0
        # The naive row runs the head at every position: more FLOPs than the project's step.
        assert rows["naive"]["flops_per_step"] > rows["project_fp32"]["flops_per_step"]
    assert set(saved["arms"]["multi"]["rows"]["naive"]["terms"]) == set(SCHEMES["multi"].terms)
    assert {(e["arm"], e["seq_len"]) for e in saved["scaling"]} == {
        (a, s) for a in SCHEMES for s in (8, 16)
    }
    assert all(e["status"] == "ok" for e in saved["scaling"])
    assert res["agreement_ok"]
    # Every row trained its own copy: the caller's student is untouched.
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "multi" in bench.format_table(res)


def test_agreement_flags_a_broken_row_end_to_end(tmp_path, monkeypatch):
    real = bench.naive_terms

    def broken(distiller, teacher, batch):
        out = real(distiller, teacher, batch)
        if "hidden" in out:
            out["hidden"] = out["hidden"] * 1.01  # a 1% error in one term
        return out

    monkeypatch.setattr(bench, "naive_terms", broken)
    cfg = bench.BenchConfig(**{**TINY.__dict__, "sweep": False, "textbrewer": False})
    res = bench.run_benchmark(
        tiny(24, 4, 1),
        tiny(16, 2, 2),
        bench.Shape(2, 8),
        {"multi": SCHEMES["multi"]},
        cfg,
        log=lambda s: None,
    )
    rows = res["arms"]["multi"]["rows"]
    # The naive row is the reference: the correct project row is the one that disagrees with it.
    assert rows["project_fp32"]["agreement"]["disagree"] == ["hidden"]
    assert not res["agreement_ok"]
    assert "DISAGREES" in bench.format_table(res)


def test_agreement_tolerances_by_precision():
    ref = {"logit": 2.0, "hidden": 0.5}
    got = bench.agreement(
        {
            "naive": ref,
            "fp32": {"logit": 2.0 + 1e-5, "hidden": 0.5},
            "bf16": {"logit": 2.02, "hidden": 0.505},
            "bad": {"logit": 2.02, "hidden": float("nan")},
            "short": {"logit": 2.0},
        },
        {"naive": "fp32", "fp32": "fp32", "bf16": "bf16", "bad": "fp32", "short": "fp32"},
        bench.BenchConfig(),
    )
    assert got["fp32"]["ok"] and got["bf16"]["ok"] and got["naive"]["ok"]
    assert got["bad"]["disagree"] == ["logit", "hidden"]
    assert got["short"]["disagree"] == ["hidden (missing)"]


@pytest.mark.parametrize("scheme", ["logit", "multi"])
def test_project_step_updates_weights_and_flops_count_masked_positions(scheme):
    teacher, student = tiny(24, 4, 1), tiny(16, 2, 2)
    start = bench.Start(teacher, bench.eager_copy(teacher), student, None)
    sch = SCHEMES[scheme]
    if scheme == "multi":
        torch.manual_seed(0)
        d = bench.Distiller(student, teacher, sch)
        start.projections = d.projections.state_dict()
    row = bench.project_row(start, sch, "fp32", TINY, torch.device("cpu"), batch_size=2)
    batches = bench.make_batches(60, bench.Shape(2, 16), 1, 0)
    w0 = row.distiller.student.bert.encoder.layer[0].output.dense.weight.clone()
    row.step(batches[0])  # lr 0 at the first step of the warm-up, as in kd/training/loop.py
    row.step(batches[0])
    assert not torch.equal(w0, row.distiller.student.bert.encoder.layer[0].output.dense.weight)
    fl = bench.row_flops(start, sch, bench.Shape(2, 16), "project_fp32", batches)
    masked = int((batches[0]["labels"] != -100).sum())
    s_enc = flops.Encoder.from_config(student.config)
    assert fl["student_head"] == flops.head_forward(s_enc, masked)
