"""Divergences between the teacher's and the student's next-token distributions.

Each divergence is a pure function of two log-probability tensors ``[N, K]`` over the same
support (the whole vocabulary, or the teacher's top-k tokens plus one bin for the rest of the
mass) and returns one value per position ``[N]``. Notation: ``p`` the teacher's distribution,
``q`` the student's, both at temperature T.

:func:`next_token_loss` is the reference the chunked loss (``kd.causal.chunked``) is tested
against: the mean over positions times T², the same scaling for every divergence, so that
switching divergence or temperature does not silently rescale the gradient (Hinton et al. 2015).
Everything is computed in float32 at least: a sum over ~50k words loses most of its precision in
bf16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

Divergence = Callable[[Tensor, Tensor], Tensor]


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_k a_k (log a_k − log b_k) per row; a term whose a_k is 0 counts 0 (0 · log 0 = 0)."""
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(torch.isneginf(log_a), torch.zeros_like(terms), terms).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w · a + (1 − w) · b), computed in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_k p_k log(p_k / q_k): mean-seeking, the soft-target loss of Hinton, Vinyals
    & Dean 2015, "Distilling the Knowledge in a Neural Network"."""
    return _kl(log_p, log_q)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(q ‖ p) = Σ_k q_k log(q_k / p_k): mode-seeking; Gu et al. 2024, "MiniLLM: Knowledge
    Distillation of Large Language Models"."""
    return _kl(log_q, log_p)


def generalized_jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """The generalized Jensen–Shannon divergence of Agarwal et al. 2024, "On-Policy Distillation
    of Language Models: Learning from Self-Generated Mistakes" (GKD):

        JSD(β)(p ‖ q) = β · KL(p ‖ m) + (1 − β) · KL(q ‖ m),   m = β · p + (1 − β) · q

    β = 0.5 is the symmetric JSD; as β → 0 (→ 1) it behaves like forward (reverse) KL scaled by
    β (1 − β), which is why both ends are excluded: there it is identically 0.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized JSD needs 0 < beta < 1, got {beta}")
    log_m = _mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """TV(p, q) = ½ Σ_k |p_k − q_k|, bounded in [0, 1]; Wen et al. 2023, "f-Divergence
    Minimization for Sequence-Level Knowledge Distillation"."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skew_forward_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """The α-skew KL of Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models":

        SKL(α)(p, q) = KL(p ‖ α · p + (1 − α) · q)

    Mixing a little of p into q keeps the log-ratio bounded (by −log α) where q has no mass, so
    the gradient stays finite early in training; α = 0 is forward KL.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew KL needs 0 <= alpha < 1, got {alpha}")
    if alpha == 0.0:
        return forward_kl(log_p, log_q)
    return _kl(log_p, _mix(log_p, log_q, alpha))


def skew_reverse_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """The α-skew reverse KL of Ko et al. 2024 (DistiLLM):

        SRKL(α)(p, q) = KL(q ‖ (1 − α) · p + α · q)

    α = 0 is reverse KL.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew reverse KL needs 0 <= alpha < 1, got {alpha}")
    if alpha == 0.0:
        return reverse_kl(log_p, log_q)
    return _kl(log_q, _mix(log_q, log_p, alpha))


# Name → function; ``beta``/``alpha`` are bound by :func:`divergence`.
DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tv": total_variation,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def divergence(name: str, *, beta: float = 0.5, alpha: float = 0.1) -> Divergence:
    """The divergence called ``name`` with its parameter bound (β for ``jsd``, α for the skew
    KLs; GKD's and DistiLLM's defaults)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}: one of {', '.join(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    if name == "jsd":
        generalized_jsd(torch.zeros(1, 1), torch.zeros(1, 1), beta)  # validates beta now
        return partial(fn, beta=beta)
    if name.startswith("skew_"):
        fn(torch.zeros(1, 1), torch.zeros(1, 1), alpha)
        return partial(fn, alpha=alpha)
    return fn


# --- Supports -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """The teacher's k most likely next tokens at each position, and what that leaves.

    ``ids`` [N, k] token ids; ``logprobs`` [N, k] their log-probabilities under the teacher's
    full softmax at the temperature it was taken at; ``rest`` [N] the log of the remaining mass
    log(1 − Σ_k p_k), or None when k is the whole vocabulary. With the rest as one more bin the
    k + 1 values are a proper distribution, so every divergence above applies unchanged.
    """

    ids: Tensor
    logprobs: Tensor
    rest: Tensor | None

    def __getitem__(self, rows: slice) -> TopK:
        return TopK(
            self.ids[rows], self.logprobs[rows], None if self.rest is None else self.rest[rows]
        )

    def support(self) -> Tensor:
        """The teacher's log-probabilities on the k tokens and the rest bin, [N, k (+1)]."""
        lp = self.logprobs.to(_compute_dtype(self.logprobs))
        return lp if self.rest is None else torch.cat([lp, self.rest.to(lp.dtype)[:, None]], -1)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def check_temperature(temperature: float) -> None:
    """Refuse T <= 0: every loss here divides the logits by T."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(z / T) over the last axis, in float32 at least."""
    z = logits.to(_compute_dtype(logits))
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def top_k(logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The teacher's top-k support at temperature T (what the teacher cache stores)."""
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    lp = log_probs(logits, temperature)
    values, ids = lp.topk(k, dim=-1)
    return TopK(ids, values, None if k == vocab else _rest(lp, ids))


def _rest(log_p: Tensor, ids: Tensor) -> Tensor:
    # log Σ_{j ∉ ids} p_j as a log-sum-exp over the complement: exact where 1 − Σ_k p_k would
    # cancel to 0 in float32, and its gradient is finite because the complement is never empty.
    return log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)


def on_support(student_logits: Tensor, support: TopK, temperature: float = 1.0) -> Tensor:
    """The student's log-probabilities on the teacher's support: the k tokens, and the rest bin
    when there is one, [N, k (+1)]."""
    lq = log_probs(student_logits, temperature)
    picked = lq.gather(-1, support.ids)
    return (
        picked if support.rest is None else torch.cat([picked, _rest(lq, support.ids)[:, None]], -1)
    )


def per_position(
    student_logits: Tensor, teacher: Tensor | TopK, div: Divergence, temperature: float = 1.0
) -> Tensor:
    """The divergence at each position, [N]; ``teacher`` is its logits [N, V] (the full
    vocabulary) or a :class:`TopK` support."""
    if isinstance(teacher, TopK):
        return div(teacher.support(), on_support(student_logits, teacher, temperature))
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} != student's {tuple(student_logits.shape)}"
        )
    return div(log_probs(teacher, temperature).detach(), log_probs(student_logits, temperature))


def next_token_loss(
    student_logits: Tensor, teacher: Tensor | TopK, div: Divergence, temperature: float = 1.0
) -> Tensor:
    """T² · (1/N) · Σ_n D(p_n, q_n) over N positions (rows) — the unchunked reference."""
    check_temperature(temperature)
    return per_position(student_logits, teacher, div, temperature).mean() * temperature**2
