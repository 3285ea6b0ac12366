from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from kd.training.gradnorm import grad_norms, layer_groups


def _model() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return BertForMaskedLM(config)


def _backward(model: BertForMaskedLM, proj: torch.nn.Module | None = None) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 6))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    loss = out.loss
    if proj is not None:
        loss = loss + proj(out.hidden_states[-1]).square().mean()
    loss.backward()


def test_groups_cover_every_param_once() -> None:
    model = _model()
    groups = layer_groups(model)
    assert list(groups)[:4] == ["embeddings", "layer_0", "layer_1", "head"]
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable


def test_tied_decoder_weight_counted_once() -> None:
    model = _model()
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight
    groups = layer_groups(model)
    assert any(p is decoder for p in groups["embeddings"])
    assert not any(p is decoder for p in groups["head"])
    assert groups["head"]  # the transform and the output bias remain


def test_frozen_params_excluded_and_pooler_goes_to_other() -> None:
    model = _model()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    model.pooler = torch.nn.Linear(16, 16)  # stands in for a parameter outside the known parts
    groups = layer_groups(model)
    frozen = model.bert.embeddings.position_embeddings.weight
    assert not any(p is frozen for params in groups.values() for p in params)
    assert {id(p) for p in groups["other"]} == {id(p) for p in model.pooler.parameters()}


def test_total_matches_clip_grad_norm_and_global_is_the_students() -> None:
    model = _model()
    proj = torch.nn.Linear(16, 24)
    _backward(model, proj)
    groups = layer_groups(model, extra={"proj": proj})
    norms = grad_norms(groups, extra=["proj"])
    params = [p for ps in groups.values() for p in ps]
    student = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9)
    assert norms["total"] == pytest.approx(total.item(), rel=1e-5)
    # "global" leaves the projections out: the same parameter set with or without them.
    only_student = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in student]))
    assert norms["global"] == pytest.approx(only_student.item(), rel=1e-5)
    assert norms["global"] < norms["total"]
    # Groups are disjoint, so their squares add up to the total, and the student's to global.
    squares = {k: v**2 for k, v in norms.items() if k not in ("global", "total")}
    assert math.sqrt(sum(squares.values())) == pytest.approx(norms["total"], rel=1e-5)
    assert math.sqrt(sum(v for k, v in squares.items() if k != "proj")) == pytest.approx(
        norms["global"], rel=1e-5)
    assert all(isinstance(v, float) for v in norms.values())


def test_extra_module_gets_its_own_group() -> None:
    model = _model()
    proj = torch.nn.Linear(16, 24)
    _backward(model, proj)
    groups = layer_groups(model, extra={"proj": proj})
    assert [id(p) for p in groups["proj"]] == [id(p) for p in proj.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in proj.parameters()]))
    assert grad_norms(groups)["proj"] == pytest.approx(expected.item(), rel=1e-5)


def test_missing_grads_count_as_zero() -> None:
    model = _model()
    groups = layer_groups(model)
    assert grad_norms(groups) == {**dict.fromkeys(groups, 0.0), "global": 0.0, "total": 0.0}
    unused = torch.nn.Linear(2, 2)
    _backward(model)
    norms = grad_norms(layer_groups(model, extra={"unused": unused}))
    assert norms["unused"] == 0.0
    assert norms["layer_0"] > 0.0
