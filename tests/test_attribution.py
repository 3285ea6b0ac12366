"""Per-term gradient attribution: it decomposes the training gradient and leaves training alone."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import LOGIT, MULTI, ds, run_train, tiny  # noqa: F401 (ds is a fixture)

from kd.core.params import Scheme, Train
from kd.distill.distiller import Distiller
from kd.models import student
from kd.training import attribution
from kd.training.gradnorm import grad_norms, layer_groups
from kd.training.loop import Stepper


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # some padding, so masked reductions are exercised
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    labels[1, 7] = ids[1, 7]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _distiller(scheme: Scheme) -> tuple[Distiller, torch.nn.Module]:
    teacher = tiny(24, 3, seed=1).eval()
    return Distiller(tiny(16, 2, seed=2), teacher, scheme), teacher


def test_term_gradients_sum_to_the_training_gradient() -> None:
    weighted = Scheme(terms={"embedding": 0.5, "hidden": 2.0, "attention": 1.0, "logit": 3.0})
    d, teacher = _distiller(weighted)
    groups = layer_groups(d.student, d.extra_groups())
    params = [p for g in groups.values() for p in g]
    terms = d(_batch(), teacher)
    per_term = attribution.term_gradients(terms, d.terms, params)
    d.total(terms).backward()
    for i, p in enumerate(params):
        parts = [g[i] for g in per_term.values() if g[i] is not None]
        summed = torch.stack(parts).sum(0) if parts else torch.zeros_like(p)
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-7)
    # The hidden term never reaches the prediction head's own parameters.
    head = {id(p) for p in groups["head"]}
    assert all(g is None for p, g in zip(params, per_term["hidden"], strict=True) if id(p) in head)


def test_summary_norms_and_cosines() -> None:
    d, teacher = _distiller(MULTI)
    groups = layer_groups(d.student, d.extra_groups())
    params = [p for g in groups.values() for p in g]
    terms = d(_batch(), teacher)
    per_term = attribution.term_gradients(terms, d.terms, params)
    # The same gradient twice: cosine 1 with itself, and norms equal kd/gradnorm's on .grad.
    twin = {"logit": per_term["logit"], "logit2": per_term["logit"], "hidden": per_term["hidden"]}
    out = attribution.summarize(twin, params, groups)
    assert out["attr/cos/logit~logit2"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 - 1e-6 <= out["attr/cos/logit~hidden"] <= 1.0 + 1e-6
    for p, g in zip(params, per_term["logit"], strict=True):
        p.grad = g
    expected = grad_norms(groups)
    for group in [*groups, "global"]:
        assert out[f"attr/logit/{group}"] == pytest.approx(expected[group], rel=1e-5), group
    assert out["attr/hidden/head"] == 0.0


def test_micro_batches_accumulate_like_the_training_gradient() -> None:
    d, teacher = _distiller(MULTI)
    groups = layer_groups(d.student, d.extra_groups())
    params = [p for g in groups.values() for p in g]
    batch = _batch()
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    acc = None
    for mb in halves:
        terms = d(mb, teacher)
        acc = attribution.accumulate(acc, attribution.term_gradients(terms, d.terms, params), 0.5)
        (d.total(terms) / 2).backward()
    for i, p in enumerate(params):
        parts = [g[i] for g in acc.values() if g[i] is not None]
        if p.grad is not None:
            torch.testing.assert_close(torch.stack(parts).sum(0), p.grad, rtol=1e-5, atol=1e-7)


def test_attribution_is_logged_and_does_not_change_training(ds, tmp_path) -> None:  # noqa: F811
    off, r_off, _ = run_train(ds, tmp_path / "off", max_steps=8, attribution_every=0)
    on, r_on, run = run_train(ds, tmp_path / "on", max_steps=8, attribution_every=4)
    # Same forward, no extra random draws: the trajectory is bit-identical.
    assert student.weights_hash(on.student) == student.weights_hash(off.student)
    assert [r["loss/total"] for r in r_on.rows] == [r["loss/total"] for r in r_off.rows]
    logged = dict(run.logged)
    assert sorted(s for s, m in logged.items() if any(k.startswith("attr/") for k in m)) == [4, 8]
    row = logged[4]
    for term in MULTI.terms:
        for group in ("embeddings", "layer_0", "layer_1", "head", "projections", "global"):
            assert math.isfinite(row[f"attr/{term}/{group}"]), (term, group)
    assert row["attr/hidden/head"] == 0.0  # the hidden term does not reach the head
    assert "attr/cos/hidden~logit" in row or "attr/cos/logit~hidden" in row
    assert r_on.summary["attribution_steps"] == 2
    assert "mean/attr/hidden/layer_0" in r_on.summary
    assert not any(k.startswith("mean/attr/") for k in r_off.summary)


def test_single_term_scheme_is_not_attributed(ds, tmp_path) -> None:  # noqa: F811
    _, result, run = run_train(ds, tmp_path, scheme=LOGIT, max_steps=4, attribution_every=2)
    assert not any(k.startswith("attr/") for _, m in run.logged for k in m)
    assert result.summary["attribution_steps"] == 0


def test_attribution_must_fall_on_logged_steps() -> None:
    with pytest.raises(ValueError, match="multiple of train.log_every"):
        Train(log_every=10, attribution_every=25)
    assert Train(log_every=10, attribution_every=0).attribution_every == 0


def test_stepper_attributes_only_on_its_steps() -> None:
    d, teacher = _distiller(MULTI)
    cfg = Train(batch_size=4, max_steps=10, log_every=5, attribution_every=5)
    s = Stepper(d, teacher, cfg, 10, "fp32", torch.device("cpu"))
    assert [k for k in range(10) if s.attributes(k)] == [4, 9]


def test_attribution_keys_reach_mlflow(ds, tmp_path) -> None:  # noqa: F811
    """Every key a training step logs is a valid MLflow metric name once kd.core.tracking has it: one
    invalid name (e.g. the "~" of a cosine's pair) fails the whole batch and the run's later
    metrics with it."""
    from mlflow.utils.validation import _validate_metric_name

    from kd.core.tracking import metric_key

    _, _, run = run_train(ds, tmp_path, max_steps=4, attribution_every=2)
    keys = {k for _, m in run.logged for k in m}
    assert any("/cos/" in k for k in keys)
    for key in keys:
        _validate_metric_name(metric_key(key))
    assert metric_key("attr/cos/hidden~logit") == "attr/cos/hidden-logit"
    assert metric_key("grad_norm/layer_0") == "grad_norm/layer_0"
