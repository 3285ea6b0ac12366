"""Next-token divergences (kd.causal.divergences) and their chunked form (kd.causal.chunked)."""

from __future__ import annotations

import math

import pytest
import torch

from kd.causal import divergences as D
from kd.causal.chunked import TeacherHead, chunked_next_token_loss

NAMES = list(D.DIVERGENCES)


def _logp(*probs: float) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log()


# p = (1/2, 1/2), q = (1/4, 3/4): each value written out by hand from the definition.
P, Q = _logp(0.5, 0.5), _logp(0.25, 0.75)
GOLDEN = {
    "forward_kl": 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75),
    "reverse_kl": 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5),
    # m = (3/8, 5/8)
    "jsd": 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
    + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)),
    "tv": 0.5 * (0.25 + 0.25),
    # α = 0.1: m = 0.1 p + 0.9 q = (0.275, 0.725)
    "skew_forward_kl": 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725),
    # α = 0.1: m = 0.9 p + 0.1 q = (0.475, 0.525)
    "skew_reverse_kl": 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525),
}


@pytest.mark.parametrize("name", NAMES)
def test_golden_values(name) -> None:
    got = D.divergence(name)(P, Q)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(GOLDEN[name], abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_zero_on_equal_distributions_positive_otherwise(name) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 11, generator=g, dtype=torch.float64).log_softmax(-1)
    b = torch.randn(5, 11, generator=g, dtype=torch.float64).log_softmax(-1)
    div = D.divergence(name)
    assert torch.allclose(div(a, a), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert (div(a, b) > 0).all()


def test_parameters_and_their_limits() -> None:
    jsd_sym = D.divergence("jsd", beta=0.5)
    assert torch.allclose(jsd_sym(P, Q), jsd_sym(Q, P))  # β = 1/2 is symmetric
    # The skews at α = 0 are the plain KLs.
    assert torch.equal(D.divergence("skew_forward_kl", alpha=0.0)(P, Q), D.forward_kl(P, Q))
    assert torch.equal(D.divergence("skew_reverse_kl", alpha=0.0)(P, Q), D.reverse_kl(P, Q))
    # The skew bounds the log-ratio where the student has (almost) no mass: ≤ −log α.
    p, q = _logp(0.5, 0.5), torch.tensor([[0.0, -1e30]], dtype=torch.float64)
    assert D.divergence("skew_forward_kl", alpha=0.1)(p, q).item() <= -math.log(0.1)
    for bad in (dict(name="jsd", beta=0.0), dict(name="jsd", beta=1.0),
                dict(name="skew_forward_kl", alpha=1.0), dict(name="skew_reverse_kl", alpha=-0.1),
                dict(name="kl")):  # fmt: skip
        with pytest.raises(ValueError):
            D.divergence(**bad)


def test_forward_kl_gradient_is_student_minus_teacher() -> None:
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 7, generator=g, dtype=torch.float64)
    D.next_token_loss(z_s, z_t, D.divergence("forward_kl")).backward()
    expected = (z_s.softmax(-1) - z_t.softmax(-1)).detach() / 4
    assert torch.allclose(z_s.grad, expected, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [None, 3])
def test_gradients_match_finite_differences(name, k) -> None:
    g = torch.Generator().manual_seed(2)
    z_s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    teacher = z_t if k is None else D.top_k(z_t, k, temperature=2.0)
    div = D.divergence(name)
    assert torch.autograd.gradcheck(
        lambda z: D.next_token_loss(z, teacher, div, temperature=2.0), (z_s,)
    )


@pytest.mark.parametrize("name", NAMES)
def test_top_k_over_the_whole_vocabulary_is_the_full_loss(name) -> None:
    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(2, 8, 13, generator=g).unbind(0)
    div = D.divergence(name)
    full = D.next_token_loss(z_s, z_t, div, temperature=1.5)
    support = D.top_k(z_t, 13, temperature=1.5)
    assert support.rest is None
    assert torch.allclose(D.next_token_loss(z_s, support, div, temperature=1.5), full, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 4, 12])
def test_top_k_with_the_rest_bin_is_proper_and_never_exceeds_the_full_loss(name, k) -> None:
    g = torch.Generator().manual_seed(4)
    z_s, z_t = torch.randn(2, 8, 13, generator=g, dtype=torch.float64).unbind(0)
    support = D.top_k(z_t, k)
    for lp in (support.support(), D.on_support(z_s, support)):
        assert lp.shape == (8, k + 1)
        assert torch.allclose(lp.logsumexp(-1), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    # Merging the tail into one bin can only lose information: every one of these divergences
    # is an f-divergence or a mixture of them, so it can only shrink (data processing).
    div = D.divergence(name)
    assert (D.per_position(z_s, support, div) <= D.per_position(z_s, z_t, div) + 1e-12).all()


def test_top_k_keeps_the_most_likely_tokens() -> None:
    z = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    support = D.top_k(z, 2)
    assert support.ids.tolist() == [[1, 3]]
    assert torch.allclose(support.logprobs.exp().sum() + support.rest.exp(), torch.tensor(1.0))
    with pytest.raises(ValueError):
        D.top_k(z, 5)


def _problem(dtype, n=10, h=6, v=17, bias=True, seed=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) / h**0.5
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    t_hidden = torch.randn(n, 8, generator=g, dtype=dtype)
    t_weight = torch.randn(v, 8, generator=g, dtype=dtype)
    return hidden, weight, b, TeacherHead(t_hidden, t_weight)


def _grads(loss_fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("teacher_kind", ["logits", "head", "top_k"])
@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_unchunked(name, teacher_kind, chunk_size, dtype) -> None:
    hidden, weight, bias, head = _problem(dtype)
    t_logits = head[slice(None)]
    teacher = {"logits": t_logits, "head": head, "top_k": D.top_k(t_logits, 5, 2.0)}[teacher_kind]
    div = D.divergence(name)

    def reference(h, w, b):
        logits = torch.nn.functional.linear(h, w, b)
        ref_teacher = head[slice(None)] if teacher_kind == "head" else teacher
        return D.next_token_loss(logits, ref_teacher, div, temperature=2.0)

    def chunked(h, w, b):
        return chunked_next_token_loss(
            h, w, teacher, div, temperature=2.0, bias=b, chunk_size=chunk_size
        )

    ref_loss, ref_grads = _grads(reference, hidden, weight, bias)
    got_loss, got_grads = _grads(chunked, hidden, weight, bias)
    assert got_loss.dtype == ref_loss.dtype
    assert torch.allclose(got_loss, ref_loss, rtol=0, atol=1e-6), (got_loss, ref_loss)
    for got, ref in zip(got_grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert torch.allclose(got, ref, rtol=0, atol=1e-6), (got - ref).abs().max()


def test_chunked_scales_with_the_upstream_gradient_and_a_frozen_head() -> None:
    hidden, weight, _, head = _problem(torch.float64, bias=False)
    div = D.divergence("forward_kl")
    h1 = hidden.clone().requires_grad_(True)
    (3.0 * chunked_next_token_loss(h1, weight, head, div, chunk_size=4)).backward()
    h2 = hidden.clone().requires_grad_(True)
    chunked_next_token_loss(h2, weight, head, div, chunk_size=4).backward()
    assert torch.allclose(h1.grad, 3.0 * h2.grad)
    assert weight.grad is None  # the head did not ask for a gradient, and got none


def test_chunked_refuses_bad_shapes() -> None:
    hidden, weight, _, head = _problem(torch.float32)
    div = D.divergence("tv")
    with pytest.raises(ValueError, match="weight"):
        chunked_next_token_loss(hidden, weight.T, head, div)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_next_token_loss(hidden, weight, head, div, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_next_token_loss(hidden, weight, head, div, temperature=0)
