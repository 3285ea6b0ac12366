from __future__ import annotations

import math

import pytest
import torch

from kd.losses import attention_mse, hidden_mse, logit_kl


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
