from __future__ import annotations

import math

import pytest
import torch

from kd.distill.hooks import attention_scores
from kd.distill.losses import (
    activation_boundary,
    attention_kl,
    attention_mse,
    hidden_cosine,
    hidden_mse,
    logit_kl,
    mean_pool,
    rkd_angle,
    rkd_distance,
    value_relation_kl,
)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_logit_kl_golden_t1() -> None:
    # Logits log(p) give exactly softmax = p, so the expected KL is written out by hand.
    teacher = torch.tensor([[math.log(0.8), math.log(0.2)], [math.log(0.5), math.log(0.5)]])
    student = torch.tensor([[math.log(0.6), math.log(0.4)], [math.log(0.9), math.log(0.1)]])
    row0 = 0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)
    row1 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    expected = (row0 + row1) / 2
    assert logit_kl(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_logit_kl_golden_t2_includes_t_squared() -> None:
    # At T=2, softmax(z/2) of logits [2·log a, 2·log b] is (a, b)/(a+b).
    teacher = torch.tensor([[2 * math.log(3.0), 2 * math.log(1.0)]])  # p_T = (3/4, 1/4)
    student = torch.tensor([[2 * math.log(1.0), 2 * math.log(1.0)]])  # p_S = (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]))
    assert logit_kl(student, teacher, 2.0).item() == pytest.approx(4.0 * kl, rel=1e-5)


def test_logit_kl_zero_for_identical() -> None:
    torch.manual_seed(0)
    z = torch.randn(5, 7)
    assert logit_kl(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kl_empty_has_grad_path() -> None:
    student = torch.zeros(0, 7, requires_grad=True)
    loss = logit_kl(student, torch.zeros(0, 7), 2.0)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 7)


def test_logit_kl_grad_and_bf16() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(4, 9, dtype=torch.bfloat16)
    loss = logit_kl(student, teacher, 2.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_hidden_mse_golden_and_zero() -> None:
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[0.0, 0.0], [3.0, 2.0]]])
    mask = torch.tensor([[1, 1]])
    # (1 + 4 + 0 + 4) / (2 positions · 2 dims)
    assert hidden_mse(s, t, mask).item() == pytest.approx(9 / 4)
    assert hidden_mse(s, s.clone(), mask).item() == 0.0


def test_hidden_mse_ignores_padding() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    before = hidden_mse(s, t, mask)
    s2 = s.clone()
    s2[0, 3] = 1e6
    s2[0, 4] = float("inf")
    assert hidden_mse(s2, t, mask).item() == pytest.approx(before.item())
    expected = ((s - t) ** 2).sum(-1)[mask.bool()].sum() / (mask.sum() * 8)
    assert before.item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_mse_grad_and_bf16() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    s_pad = s.clone()
    s_pad[0, 2] = float("inf")  # padding may hold garbage; it must not poison the gradient
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = hidden_mse(s_pad, t, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[0, 2] == 0).all() and (s.grad[0, 0] != 0).any()


def _masked_scores(b: int, h: int, length: int, mask: torch.Tensor) -> torch.Tensor:
    scores = torch.randn(b, h, length, length)
    return scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))


def test_attention_mse_golden_and_zero() -> None:
    s = torch.zeros(1, 2, 2, 2)
    t = torch.zeros(1, 2, 2, 2)
    t[0, 0, 0, 0] = 2.0  # squared error 4 in head 0
    t[0, 1, 1, 0] = 1.0  # squared error 1 in head 1
    mask = torch.tensor([[1, 1]])
    # 5 / (2 heads · 4 pairs)
    assert attention_mse(s, t, mask).item() == pytest.approx(5 / 8)
    assert attention_mse(t, t.clone(), mask).item() == 0.0


def test_attention_mse_ignores_masked_pairs_and_inf() -> None:
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    s, t = _masked_scores(2, 3, 4, mask), _masked_scores(2, 3, 4, mask)
    loss = attention_mse(s, t, mask)
    assert torch.isfinite(loss)
    # Padded query row of batch 0 also must not count.
    s2 = s.clone()
    s2[0, :, 3, :] = 123.0
    assert attention_mse(s2, t, mask).item() == pytest.approx(loss.item())
    pair = (mask[:, None, :, None] * mask[:, None, None, :]).expand_as(s).bool()
    expected = ((s - t)[pair] ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_attention_mse_grad_through_inf_and_bf16() -> None:
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0]])
    s = _masked_scores(1, 2, 3, mask).to(torch.bfloat16).requires_grad_()
    t = _masked_scores(1, 2, 3, mask).to(torch.bfloat16)
    loss = attention_mse(s, t, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[..., 2] == 0).all() and s.grad.abs().sum() > 0


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        hidden_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError):
        logit_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


# ---------------------------------------------------------------- DistilBERT: cosine hidden loss


def test_hidden_cosine_golden_ignores_padding() -> None:
    s = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    t = torch.tensor([[[0.0, 1.0], [4.0, 3.0], [float("inf"), 1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: orthogonal, 1 - 0 = 1; token 1: cos = 24/25, 1 - 24/25 = 1/25; padding ignored.
    assert hidden_cosine(s, t, mask).item() == pytest.approx((1 + 1 / 25) / 2, rel=1e-6)
    # Scale-free: only directions count.
    assert hidden_cosine(7 * t[:, :2], t[:, :2], mask[:, :2]).item() == pytest.approx(0, abs=1e-6)


def test_hidden_cosine_grad_through_garbage_padding_and_bf16() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    s[0, 2] = float("nan")
    s.requires_grad_()
    t = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    loss = hidden_cosine(s, t, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[0, 2] == 0).all()
    assert hidden_cosine(s, t, torch.zeros(2, 3)).item() == 0.0


# --------------------------------------------------------- MiniLM: attention and value relations


def test_attention_kl_golden_over_real_tokens_and_heads() -> None:
    # Head 0: the logit_kl golden rows as attention logits; head 1: student equals teacher.
    # A third, padded position holds garbage that must not count as a key or a query.
    big = 50.0
    t0 = [[math.log(0.8), math.log(0.2), big], [math.log(0.5), math.log(0.5), big], [1, 2, 3]]
    s0 = [[math.log(0.6), math.log(0.4), -big], [math.log(0.9), math.log(0.1), 0.0], [3, 2, 1]]
    same = [[0.3, -0.1, 9.0], [0.0, 2.0, 9.0], [0.0, 0.0, 0.0]]
    teacher = torch.tensor([[t0, same]])
    student = torch.tensor([[s0, same]])
    mask = torch.tensor([[1, 1, 0]])
    row0 = 0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)
    row1 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    # Σ over heads and real queries / (2 heads · 2 real tokens); head 1 contributes 0.
    want = (row0 + row1 + 0 + 0) / 4
    assert attention_kl(student, teacher, mask).item() == pytest.approx(want, rel=1e-5)


def test_attention_kl_takes_masked_scores_and_bf16() -> None:
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0]])
    q, k = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    s = attention_scores(q, k, 2, mask).to(torch.bfloat16).requires_grad_()
    t = attention_scores(k, q, 2, mask).to(torch.bfloat16)
    loss = attention_kl(s, t, mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[..., 3] == 0).all()
    assert attention_kl(t, t.clone(), mask).item() == pytest.approx(0, abs=1e-6)


def test_value_relation_kl_golden_with_different_widths() -> None:
    # One head. Student V = 0 (d = 1): every relation row is uniform (1/2, 1/2).
    # Teacher V = [[a, a], [0, 0]] (d = 2): logits V Vᵀ/√2 = [[√2 a², 0], [0, 0]]; with
    # √2 a² = 1, row 0 is softmax(1, 0) = (e, 1)/(e + 1) and row 1 is uniform.
    a = 2**-0.25
    teacher = torch.tensor([[[a, a], [0.0, 0.0]]])
    student = torch.zeros(1, 2, 1)
    p = math.e / (math.e + 1)
    row0 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    got = value_relation_kl(student, teacher, 1, torch.tensor([[1, 1]]))
    assert got.item() == pytest.approx(row0 / 2, rel=1e-5)


# ------------------------------------------------------------------------- RKD: distance, angle


def test_mean_pool_over_real_tokens() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("inf"), 0.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_rkd_distance_golden_quadratic_part() -> None:
    # Teacher 0, 1, 3: distances (1, 3, 2), mean 2 -> ψ = (0.5, 1.5, 1.0).
    # Student 0, 2, 4: distances (2, 4, 2), mean 8/3 -> ψ = (0.75, 1.5, 0.75).
    # Differences 0.25, 0, 0.25 (< 1, so 0.5·x²), each pair counted in both orders.
    t = torch.tensor([[0.0], [1.0], [3.0]])
    s = torch.tensor([[0.0], [2.0], [4.0]])
    want = 2 * (0.5 * 0.25**2 + 0 + 0.5 * 0.25**2) / 6
    assert rkd_distance(s, t).item() == pytest.approx(want, rel=1e-5)


def test_rkd_distance_golden_linear_part() -> None:
    # Teacher 0, 1, 10: distances (1, 10, 9), mean 20/3 -> ψ = (3/20, 30/20, 27/20).
    # Student 0, 10, 11: distances (10, 11, 1), mean 22/3 -> ψ = (30/22, 33/22, 3/22).
    # |differences| = 30/22 - 3/20 > 1 (so |x| - 0.5), 0, and the same again.
    t = torch.tensor([[0.0], [1.0], [10.0]])
    s = torch.tensor([[0.0], [10.0], [11.0]])
    x = 30 / 22 - 3 / 20
    want = 2 * (2 * (x - 0.5)) / 6
    assert rkd_distance(s, t).item() == pytest.approx(want, rel=1e-5)


def test_rkd_angle_golden() -> None:
    # Teacher: right isosceles triangle; angles 90°, 45°, 45° -> cosines 0, r, r (r = 1/√2).
    # Student: equilateral; every cosine 1/2. Each vertex counts twice ((i, k) and (k, i)).
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    r = 1 / math.sqrt(2)
    want = (2 * 0.5 * (0.5 - 0) ** 2 + 4 * 0.5 * (0.5 - r) ** 2) / 6
    assert rkd_angle(s, t).item() == pytest.approx(want, rel=1e-5)


def test_rkd_is_scale_translation_and_width_free() -> None:
    torch.manual_seed(0)
    t = torch.randn(5, 3)
    # The same configuration, scaled, shifted and embedded in 4 dimensions.
    s = torch.cat([3 * t + 1.5, torch.zeros(5, 1)], dim=1).requires_grad_()
    assert rkd_distance(s, t).item() == pytest.approx(0, abs=1e-6)
    assert rkd_angle(s, t).item() == pytest.approx(0, abs=1e-6)
    # A match is a minimum: no gradient there.
    (rkd_distance(s, t) + rkd_angle(s, t)).backward()
    assert s.grad.abs().max() < 1e-5
    # Away from it the gradient is the loss's own: finite, nonzero, and a small step against it
    # lowers both losses.
    for loss_fn in (rkd_distance, rkd_angle):
        x = torch.randn(5, 4, requires_grad=True)
        loss = loss_fn(x, t)
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        with torch.no_grad():
            assert loss_fn(x - 1e-2 * x.grad, t) < loss


def test_rkd_small_batches_and_coincident_points() -> None:
    one = torch.randn(1, 3, requires_grad=True)
    assert rkd_distance(one, torch.randn(1, 4)).item() == 0.0
    two = torch.randn(2, 3, requires_grad=True)
    assert rkd_angle(two, torch.randn(2, 4)).item() == 0.0
    rkd_angle(two, torch.randn(2, 4)).backward()  # zero, but on a grad path: the loop can add it
    assert two.grad is not None and (two.grad == 0).all()
    # Two identical sequences in a batch: finite loss and gradient.
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 0.0]])
    loss = rkd_distance(s, t) + rkd_angle(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ------------------------------------------------------------ Heo et al.: activation boundaries


def test_activation_boundary_golden() -> None:
    s = torch.tensor([[[0.5, -2.0], [2.0, 0.0], [float("nan"), 1.0]]])
    t = torch.tensor([[[1.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # t > 0: relu(μ - s)²;  t <= 0: relu(μ + s)²; over 2 real tokens × 2 neurons.
    # μ = 1:   (1-0.5)² = 0.25, (1+2)² = 9  |  (1+2)² = 9, (1+0)² = 1
    assert activation_boundary(s, t, mask, 1.0).item() == pytest.approx(19.25 / 4)
    # μ = 0.5: (0)² = 0, (2.5)² = 6.25  |  (2.5)² = 6.25, (0.5)² = 0.25
    assert activation_boundary(s, t, mask, 0.5).item() == pytest.approx(12.75 / 4)


def test_activation_boundary_zero_past_the_margin_and_grad() -> None:
    t = torch.tensor([[[3.0, -0.2]]])
    s = torch.tensor([[[1.5, -1.0]]], requires_grad=True)  # right side, at least μ = 1 past 0
    loss = activation_boundary(s, t, torch.ones(1, 1), 1.0)
    assert loss.item() == 0.0
    bad = torch.tensor([[[0.0, 0.0], [float("inf"), 0.0]]], requires_grad=True)
    loss = activation_boundary(bad, torch.ones(1, 2, 2), torch.tensor([[1, 0]]), 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(bad.grad).all()
    with pytest.raises(ValueError):
        activation_boundary(s, t, torch.ones(1, 1), 0.0)


def test_no_mask_equals_an_all_ones_mask():
    # The packed-block fast path (mask=None) computes the masked formula exactly.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    a_s, a_t = torch.randn(2, 2, 5, 5, generator=g), torch.randn(2, 2, 5, 5, generator=g)
    ones = torch.ones(2, 5)
    torch.testing.assert_close(hidden_mse(s, t, None), hidden_mse(s, t, ones))
    torch.testing.assert_close(attention_mse(a_s, a_t, None), attention_mse(a_s, a_t, ones))


def test_logit_kl_fast_path_equals_autograd_through_kl_div() -> None:
    # A teacher that needs no gradient takes _SoftTargetKL; one that does takes kl_div.
    torch.manual_seed(0)
    for temperature in (1.0, 2.0):
        z_s = (torch.randn(37, 301) * 3).requires_grad_()
        z_t = z_s.detach() + torch.randn(37, 301)
        fast = logit_kl(z_s, z_t, temperature)
        (g_fast,) = torch.autograd.grad(fast, z_s, retain_graph=True)
        (g_again,) = torch.autograd.grad(fast, z_s)  # a retained graph differentiates twice
        ref = logit_kl(z_s, z_t.clone().requires_grad_(), temperature)
        (g_ref,) = torch.autograd.grad(ref, z_s)
        torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(g_again, g_fast, rtol=0, atol=0)


def test_logit_kl_fast_path_in_bf16_matches_float32_and_keeps_the_dtype() -> None:
    torch.manual_seed(1)
    z_s = torch.randn(16, 500, dtype=torch.bfloat16, requires_grad=True)
    z_t = torch.randn(16, 500, dtype=torch.bfloat16)
    loss = logit_kl(z_s, z_t, 1.0)
    loss.backward()
    assert loss.dtype == torch.float32 and z_s.grad.dtype == torch.bfloat16
    z32 = z_s.detach().float().requires_grad_()
    ref = logit_kl(z32, z_t.float().requires_grad_(), 1.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)  # the sums run in float32
    torch.testing.assert_close(z_s.grad.float(), z32.grad, rtol=1e-2, atol=1e-5)  # bf16 grads
