"""The causal distillation forward (kd.causal.distiller): the logit arm and the multi arm's terms,
read with hooks, against the naive path (full logits, output_hidden_states, output_attentions)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_llama

from kd.causal import divergences as D
from kd.causal.distiller import CausalDistiller
from kd.causal.students import from_config, from_teacher_layers
from kd.core.params import CausalScheme
from kd.distill.losses import attention_kl

ALL = {"logit": 1.0, "hidden": 1.0, "attention": 1.0, "embedding": 1.0}
MULTI = CausalScheme(terms=ALL)
LOGIT = CausalScheme(terms={"logit": 1.0})
LAYER_MAP = [1, 4]  # student blocks 1, 2 imitate teacher blocks 1 and 4 (its own origins)


def causal_attention_kl(student, teacher):
    return attention_kl(student, teacher, causal=True, probs=True)


def terms(student, teacher, ids, scheme, layer_map=LAYER_MAP, cache=None, chunk_size=7,
          width=16):  # fmt: skip
    """The distiller's terms and their weighted total, as the training loop computes them."""
    d = CausalDistiller(student, width, scheme, layer_map, chunk_size)
    batch = {"input_ids": ids}
    if cache is not None:  # [B · (L − 1), k] -> the rows a batch carries, [B, L − 1, k]
        rows, positions = ids.shape[0], ids.shape[1] - 1
        batch |= {"topk_ids": cache.ids.view(rows, positions, -1),
                  "topk_logprobs": cache.logprobs.view(rows, positions, -1)}  # fmt: skip
        if cache.rest is not None:
            batch["topk_rest"] = cache.rest.view(rows, positions)
    out = d(batch, teacher)
    out["total"] = d.total(out)
    terms.last = d
    return out


def _eager(model):
    model.set_attn_implementation("eager")
    return model


def _pair():
    teacher = _eager(tiny_llama(layers=4, seed=0))
    student = _eager(from_teacher_layers(teacher, [0, 3]))
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(4))
    return teacher, student, ids


def test_causal_attention_kl_by_hand() -> None:
    # One head, two positions: row 0 attends only to itself in both (KL 0); row 1: teacher
    # (1/2, 1/2), student (1/4, 3/4). The mean over the two rows.
    teacher = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    student = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert causal_attention_kl(student, teacher).item() == pytest.approx(expected, abs=1e-7)
    # The encoder form (pre-softmax scores, every key) of a causal map is the same KL when the
    # future keys hold -inf, as a causal mask makes them.
    scores = torch.tensor([[[[0.0, float("-inf")], [0.0, math.log(3.0)]]]])
    assert attention_kl(scores, teacher.log(), causal=True).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="head counts"):
        causal_attention_kl(student, teacher.expand(1, 2, 2, 2))


def test_logit_term_is_the_naive_loss_with_the_same_gradients() -> None:
    teacher, student, ids = _pair()
    scheme = CausalScheme(terms={"logit": 1.0}, divergence="jsd", temperature=2.0)
    got = terms(student, teacher, ids, scheme, chunk_size=5)
    got["total"].backward()
    chunked_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():
        t_logits = teacher(ids).logits[:, :-1].flatten(0, 1)
    s_logits = student(ids).logits[:, :-1].flatten(0, 1)
    naive = D.next_token_loss(s_logits, t_logits, D.divergence("jsd"), temperature=2.0)
    naive.backward()
    assert set(got) == {"logit", "total"}
    assert torch.allclose(got["logit"], naive, atol=1e-6)
    for a, p in zip(chunked_grads, student.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_the_cache_replaces_the_online_teacher_for_the_logit_term() -> None:
    teacher, student, ids = _pair()
    with torch.no_grad():
        support = D.top_k(teacher(ids).logits[:, :-1].flatten(0, 1), 64)  # k = V
    online = terms(student, teacher, ids, LOGIT)["logit"]
    cached = terms(student, None, ids, LOGIT, cache=support)["logit"]
    assert torch.allclose(cached, online, atol=1e-6)


def test_representation_terms_match_the_naive_path() -> None:
    teacher, student, ids = _pair()
    got = terms(student, teacher, ids, MULTI)
    # The student was cut from these teacher blocks with identity projections: its embedding
    # and its first block equal the teacher's; its second block runs on a different input.
    assert got["embedding"].item() == 0.0
    s = student(ids, output_hidden_states=True, output_attentions=True)
    t = teacher(ids, output_hidden_states=True, output_attentions=True)
    # hidden_states[i] is block i's input: block i's output (i < last) is hidden_states[i + 1].
    first = torch.nn.functional.mse_loss(s.hidden_states[1], t.hidden_states[1])
    assert first.item() == 0.0
    attn = torch.stack([causal_attention_kl(s.attentions[0], t.attentions[0]),
                        causal_attention_kl(s.attentions[1], t.attentions[3])]).mean()  # fmt: skip
    assert torch.allclose(got["attention"], attn, atol=1e-6) and got["attention"] > 0
    assert got["hidden"] > 0
    weights = {"logit": 1.0, "hidden": 1.0, "attention": 1.0, "embedding": 1.0}
    assert torch.allclose(got["total"], sum(weights[k] * got[k] for k in weights))


def test_an_uncut_student_has_nothing_to_learn() -> None:
    teacher = _eager(tiny_llama(layers=4, seed=0))
    student = _eager(from_teacher_layers(teacher, [0, 1, 2, 3]))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    got = terms(student, teacher, ids, MULTI, [1, 2, 3, 4])
    for name in ("logit", "hidden", "attention", "embedding"):
        assert got[name].item() == pytest.approx(0.0, abs=1e-6), name


def test_the_multi_arm_trains() -> None:
    teacher, student, ids = _pair()
    d = CausalDistiller(student, 16, MULTI, LAYER_MAP, chunk_size=7)
    proj = d.projections
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = d({"input_ids": ids}, teacher)
        out["total"] = d.total(out)
        out["total"].backward()
        opt.step()
        losses.append(out["total"].item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is not None for p in proj.parameters())


def test_missing_pieces_are_named() -> None:
    teacher, student, ids = _pair()
    with pytest.raises(ValueError, match="representation terms.*need the online teacher"):
        terms(student, None, ids, MULTI)
    with pytest.raises(ValueError, match="without a cache, need the online teacher"):
        terms(student, None, ids, LOGIT)
    sdpa = tiny_llama(layers=4, seed=0)
    sdpa.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):
        terms(from_teacher_layers(sdpa, [0, 3]), sdpa, ids, MULTI)


def test_a_narrower_student_distils_through_projections() -> None:
    teacher = _eager(tiny_llama(layers=4, seed=0))
    shape = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=16)  # fmt: skip
    student = _eager(from_config(teacher, 3, **shape))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    out = terms(student, teacher, ids, MULTI)
    out["total"].backward()
    proj = terms.last.projections
    assert all(
        torch.isfinite(out[k]) and out[k] > 0 for k in ("logit", "hidden", "attention", "embedding")
    )
    assert proj.maps["0"].weight.grad.shape == (16, 8)


def test_relative_mse_golden_value_and_scale_free() -> None:
    from kd.causal.distiller import relative_mse

    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    t = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    # Σ||s − t||² = 0 + 1 + 4 = 5; Σ||t||² = 1 + 1 + 4 = 6.
    assert relative_mse(s, t).item() == pytest.approx(5 / 6)
    assert relative_mse(100 * s, 100 * t).item() == pytest.approx(5 / 6)
    assert relative_mse(t, t).item() == 0.0
    assert relative_mse(torch.zeros_like(t), t).item() == pytest.approx(1.0)
    # Per sequence, then the mean over the batch: row 2's ratio is (0 + 4) / (4 + 4) = 1/2.
    s2 = torch.cat([s, torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])])
    t2 = torch.cat([t, torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])])
    assert relative_mse(s2, t2).item() == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert relative_mse(s2, t2).item() == pytest.approx(
        (relative_mse(s2[:1], t2[:1]) + relative_mse(s2[1:], t2[1:])).item() / 2)


def test_the_plain_mse_option_is_tinybert_s_and_differs_from_the_default() -> None:
    from kd.distill.losses import hidden_mse

    teacher, student, ids = _pair()
    plain = CausalScheme(terms={"hidden": 1.0}, representation_loss="mse")
    got = terms(student, teacher, ids, plain)["hidden"]
    from kd.causal.distiller import representations

    with torch.no_grad(), representations(student, False) as s, representations(teacher, False) as t:
        student.model(input_ids=ids)
        teacher.model(input_ids=ids)
    want = torch.stack([hidden_mse(s["blocks"][i], t["blocks"][j - 1], None)
                        for i, j in enumerate(LAYER_MAP)]).mean()  # fmt: skip
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    rel = terms(student, teacher, ids, CausalScheme(terms={"hidden": 1.0}))["hidden"]
    assert rel.item() != pytest.approx(got.item())
