"""The fast distillation forward computes exactly what the naive way computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from kd.core.params import Scheme
from kd.distill import losses
from kd.distill.distiller import Distiller

MULTI = Scheme(terms={"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logit": 1.0})
# Every new term that has a naive (hook-free) path, and the logit term.
RELATIONAL = Scheme(
    terms={
        "hidden_cosine": 1.0,
        "minilm_attention": 1.0,
        "minilm_value": 1.0,
        "rkd_distance": 1.0,
        "rkd_angle": 1.0,
        "logit": 1.0,
    }
)


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
    terms = scheme.active_terms
    s_model = distiller.student
    s = s_model(
        b["input_ids"],
        attention_mask=b["attention_mask"],
        output_hidden_states=True,
        output_attentions=True,
    )
    with torch.no_grad():
        t = teacher(
            b["input_ids"],
            attention_mask=b["attention_mask"],
            output_hidden_states=True,
            output_attentions=True,
        )
    mask = b["attention_mask"]
    proj = distiller.projections
    out = {}
    if "embedding" in terms:
        out["embedding"] = losses.hidden_mse(proj(s.hidden_states[0], 0), t.hidden_states[0], mask)
    if "hidden" in terms:
        out["hidden"] = sum(
            losses.hidden_mse(proj(s.hidden_states[i], i), t.hidden_states[m], mask)
            for i, m in enumerate(distiller.layer_map, start=1)
        )
    if "attention" in terms:
        out["attention"] = sum(
            losses.attention_mse(s.attentions[i - 1], t.attentions[m - 1], mask)
            for i, m in enumerate(distiller.layer_map, start=1)
        )
    if "logit" in terms:
        where = b["labels"] != -100
        out["logit"] = losses.logit_kl(s.logits[where], t.logits[where], scheme.temperature)
    if "hidden_cosine" in terms:
        n = len(s.hidden_states) - 1
        out["hidden_cosine"] = losses.hidden_cosine(
            proj(s.hidden_states[-1], n), t.hidden_states[-1], mask
        )
    if "minilm_attention" in terms:
        # Log-probabilities are logits of the same softmax over the real keys; the clamp keeps
        # log's gradient finite at padded keys, whose probability is exactly 0.
        def logits(probs):
            return probs.clamp(min=torch.finfo(probs.dtype).tiny).log()

        out["minilm_attention"] = losses.attention_kl(
            logits(s.attentions[-1]), logits(t.attentions[-1]), mask
        )
    if "minilm_value" in terms:
        # The last layer's values, recomputed from its input (no hooks).
        def values(model, out):
            return model.bert.encoder.layer[-1].attention.self.value(out.hidden_states[-2])

        with torch.no_grad():
            t_values = values(teacher, t)
        out["minilm_value"] = losses.value_relation_kl(
            values(s_model, s), t_values, s_model.config.num_attention_heads, mask
        )
    s_pool = losses.mean_pool(s.hidden_states[-1], mask)
    t_pool = losses.mean_pool(t.hidden_states[-1], mask)
    if "rkd_distance" in terms:
        out["rkd_distance"] = losses.rkd_distance(s_pool, t_pool)
    if "rkd_angle" in terms:
        out["rkd_angle"] = losses.rkd_angle(s_pool, t_pool)
    return out


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "packed"])
@pytest.mark.parametrize("scheme", [MULTI, RELATIONAL], ids=["multi", "relational"])
@pytest.mark.parametrize("t_layers", [6, 4])
def test_fast_path_equals_naive_path(t_layers, scheme, pad):
    # "packed" (no padding) takes the unmasked fused-kernel path of the MSE terms.
    teacher = tiny(24, t_layers, eager=True, seed=1)
    student = tiny(16, 4, eager=True, seed=2)
    d = Distiller(student, teacher, scheme)
    b = batch(pad=pad)
    fast = d(b, teacher)
    ref = naive_terms(d, teacher, b, scheme)
    assert fast.keys() == ref.keys() == scheme.active_terms.keys()
    for k in fast:
        assert fast[k].dtype == torch.float32 and fast[k] > 0, k
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("scheme", [MULTI, RELATIONAL], ids=["multi", "relational"])
def test_fast_path_gradients_equal_naive_path(scheme):
    teacher = tiny(24, 6, eager=True, seed=1)
    student = tiny(16, 4, eager=True, seed=2)
    d = Distiller(student, teacher, scheme)
    b = batch()
    d.total(d(b, teacher)).backward()
    fast = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    d.zero_grad()
    ref = naive_terms(d, teacher, b, scheme)
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


def test_activation_boundary_reads_mapped_ffn_pre_activations():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    scheme = Scheme(terms={"activation_boundary": 1.0}, ab_margin=0.5)
    d = Distiller(student, teacher, scheme)
    assert d.projections is None and set(d.connectors) == {"1", "2", "3", "4"}
    assert d.connectors["1"].in_features == 32 and d.connectors["1"].out_features == 48
    assert set(d.extra_groups()) == {"connectors"}
    b = batch()
    # Independent capture: plain forward hooks on the FFNs' first linear maps.
    got = {}

    def keep(name):
        return lambda m, i, o: got.__setitem__(name, o)

    handles = [
        layer.intermediate.dense.register_forward_hook(keep(f"s{i}"))
        for i, layer in enumerate(student.bert.encoder.layer, start=1)
    ]
    handles += [
        layer.intermediate.dense.register_forward_hook(keep(f"t{i}"))
        for i, layer in enumerate(teacher.bert.encoder.layer, start=1)
    ]
    with torch.no_grad():
        student(b["input_ids"], attention_mask=b["attention_mask"])
        teacher(b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    want = sum(
        losses.activation_boundary(
            d.connectors[str(i)](got[f"s{i}"]), got[f"t{m}"], b["attention_mask"], 0.5
        )
        for i, m in enumerate(d.layer_map, start=1)
    )
    out = d(b, teacher)
    assert set(out) == {"activation_boundary"}
    torch.testing.assert_close(out["activation_boundary"], want, rtol=1e-5, atol=1e-6)
    out["activation_boundary"].backward()
    assert d.connectors["4"].weight.grad is not None
    assert student.bert.encoder.layer[0].intermediate.dense.weight.grad is not None


def test_hidden_cosine_shares_the_last_layer_projection():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    alone = Distiller(student, teacher, Scheme(terms={"hidden_cosine": 1.0}))
    assert set(alone.projections.maps) == {"4"}
    both = Distiller(student, teacher, Scheme(terms={"hidden": 1.0, "hidden_cosine": 1.0}))
    assert set(both.projections.maps) == {"1", "2", "3", "4"}


@pytest.mark.parametrize("term", ["minilm_attention", "minilm_value"])
def test_minilm_terms_need_equal_head_counts(term):
    teacher, student = tiny(24, 6, heads=4, seed=1), tiny(16, 4, heads=2, seed=2)
    with pytest.raises(SystemExit, match=f"{term}.*heads"):
        Distiller(student, teacher, Scheme(terms={term: 1.0}))
    # RKD needs no matching heads or widths.
    Distiller(student, teacher, Scheme(terms={"rkd_distance": 1.0, "rkd_angle": 1.0}))


def test_set_progress_is_a_no_op_without_schedules():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    scheme = MULTI.model_copy(update={"temperature": 2.0})
    d = Distiller(student, teacher, scheme)
    terms, temperature = d.terms, d.temperature
    b = batch()
    before = d(b, teacher)
    for step in (0, 5, 9):
        d.set_progress(step, 10)
        assert d.terms is terms and d.temperature == temperature == 2.0
    after = d(b, teacher)
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)


def test_set_progress_moves_temperature_and_weights():
    teacher, student = tiny(24, 6, seed=1), tiny(16, 4, seed=2)
    scheme = Scheme(
        terms={"hidden": 2.0, "logit": 1.0},
        temperature=4.0,
        temperature_schedule={"kind": "linear", "end": 1.0},
        weight_schedules={"hidden": {"kind": "linear", "end": 0.0}},
    )
    d = Distiller(student, teacher, scheme)
    assert d.terms == {"hidden": 2.0, "logit": 1.0} and d.temperature == 4.0
    b = batch()
    d.set_progress(0, 5)
    first = d(b, teacher)
    assert d.temperature == 4.0
    d.set_progress(2, 5)
    assert d.temperature == pytest.approx(2.5) and d.terms["hidden"] == pytest.approx(1.0)
    d.set_progress(4, 5)
    last = d(b, teacher)
    assert d.temperature == 1.0 and d.terms == {"hidden": 0.0, "logit": 1.0}
    # The term is still computed (and logged) while its weight is 0; the logit term follows T.
    assert set(last) == {"hidden", "logit"}
    torch.testing.assert_close(d.total(last), last["logit"])
    at_t1 = Distiller(student, teacher, Scheme(terms={"logit": 1.0}))
    at_t1.load_state_dict(d.state_dict(), strict=False)
    torch.testing.assert_close(last["logit"], at_t1(b, teacher)["logit"])
    assert not torch.equal(first["logit"], last["logit"])
