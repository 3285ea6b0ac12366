"""The fast distillation forward computes exactly what the naive way computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from kd import losses
from kd.distill import Distiller
from kd.params import Scheme

MULTI = Scheme(terms={"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logit": 1.0})


def tiny(hidden: int, layers: int, heads: int = 2, seed: int = 0, eager: bool = False):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **({"attn_implementation": "eager"} if eager else {}),
    )
    return BertForMaskedLM(cfg).eval()


def batch(seed: int = 0, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (3, 12), generator=g)
    att = torch.ones_like(ids)
    if pad:
        att[1, 9:] = 0
        att[2, 5:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 7] = ids[0, 7]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def naive_terms(distiller: Distiller, teacher, b, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The way common toolkits do it: every hidden state, eager attentions, full-vocab logits."""
    s_model = distiller.student
    s = s_model(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                output_attentions=True)
    with torch.no_grad():
        t = teacher(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                    output_attentions=True)
    mask = b["attention_mask"]
    proj = distiller.projections
    out = {"embedding": losses.hidden_mse(proj(s.hidden_states[0], 0), t.hidden_states[0], mask)}
    out["hidden"] = sum(
        losses.hidden_mse(proj(s.hidden_states[i], i), t.hidden_states[m], mask)
        for i, m in enumerate(distiller.layer_map, start=1)
    )
    out["attention"] = sum(
        losses.attention_mse(s.attentions[i - 1], t.attentions[m - 1], mask)
        for i, m in enumerate(distiller.layer_map, start=1)
    )
    where = b["labels"] != -100
    out["logit"] = losses.logit_kl(s.logits[where], t.logits[where], scheme.temperature)
    return out


@pytest.mark.parametrize("t_layers", [6, 4])
def test_fast_path_equals_naive_path(t_layers):
    teacher = tiny(24, t_layers, eager=True, seed=1)
    student = tiny(16, 4, eager=True, seed=2)
    d = Distiller(student, teacher, MULTI)
    b = batch()
    fast = d(b, teacher)
    ref = naive_terms(d, teacher, b, MULTI)
    assert fast.keys() == ref.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fast_path_gradients_equal_naive_path():
    teacher = tiny(24, 6, eager=True, seed=1)
    student = tiny(16, 4, eager=True, seed=2)
    d = Distiller(student, teacher, MULTI)
    b = batch()
    d.total(d(b, teacher)).backward()
    fast = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    d.zero_grad()
    ref = naive_terms(d, teacher, b, MULTI)
    d.total(ref).backward()
    for n, p in d.named_parameters():
        if n in fast:
            torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_logit_scheme_has_one_term_and_no_projections():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    d = Distiller(student, teacher, Scheme(terms={"logit": 1.0}))
    assert d.projections is None
    assert set(d(batch(), teacher)) == {"logit"}


def test_logit_at_all_positions_matches_full_vocab_kl():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    scheme = Scheme(terms={"logit": 1.0}, logit_positions="all", temperature=2.0)
    d = Distiller(student, teacher, scheme)
    b = batch()
    got = d(b, teacher)["logit"]
    s = student(b["input_ids"], attention_mask=b["attention_mask"]).logits
    t = teacher(b["input_ids"], attention_mask=b["attention_mask"]).logits
    real = b["attention_mask"].bool()
    p_t = F.softmax(t[real] / 2, -1)
    want = (p_t * (p_t.log() - F.log_softmax(s[real] / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attention_loss_needs_equal_head_counts():
    teacher, student = tiny(24, 6, heads=4, seed=1), tiny(16, 4, heads=2, seed=2)
    with pytest.raises(SystemExit, match="heads"):
        Distiller(student, teacher, MULTI)
    # Without the attention term the head counts may differ.
    Distiller(student, teacher, Scheme(terms={"hidden": 1.0, "logit": 1.0}))


def test_shared_projection_is_one_linear_map():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    shared = Distiller(student, teacher, MULTI.model_copy(update={"projection": "shared"}))
    per_layer = Distiller(student, teacher, MULTI)
    assert len(shared.projections.maps) == 1
    assert len(per_layer.projections.maps) == 5  # embeddings + 4 layers


def test_teacher_gets_no_gradient_and_stays_in_eval():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    d = Distiller(student, teacher, MULTI)
    d.total(d(batch(), teacher)).backward()
    assert all(p.grad is None for p in teacher.parameters())
