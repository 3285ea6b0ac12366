"""Distillation losses as pure functions of tensors.

Every reduction runs in float32: bf16 has an 8-bit mantissa, so sums over a vocabulary or over
every (query, key) pair lose most of their precision if accumulated in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.distill.hooks import attention_scores


def logit_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Soft-target loss of Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
    Network".

        L = T² · (1/N) · Σ_n KL(p_T,n || p_S,n),   p = softmax(z / T)

    Args:
        student_logits: [N, V] student logits at the positions that count.
        teacher_logits: [N, V] teacher logits at the same positions.
        temperature: T > 0.

    Returns:
        A float32 scalar. The T² factor is applied at every T (including T = 1) so that the
        gradient magnitude stays comparable when T changes, as the paper recommends.

    At ~300 masked positions × 30,522 words every pass over the logits counts, so: at T = 1 the
    division is skipped, and when the teacher's logits need no gradient (distillation) the KL
    and its gradient (p_S − p_T)/N come from :class:`_SoftTargetKL`, which makes ~40 % fewer
    passes than autograd through ``kl_div`` (same sums, float32). (Writing the KL as
    H(p_T, p_S) − H(p_T) with the fused soft-target cross-entropy would be faster still, but it
    subtracts two numbers near log V and loses ~1e-6 absolute, too much for small KLs.)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        # A batch with no selected positions must still be backward-able, and batchmean would
        # divide by zero.
        return student_logits.float().sum() * 0.0
    z_s, z_t = student_logits, teacher_logits.float()
    if temperature != 1.0:
        z_s, z_t = z_s.float() / temperature, z_t / temperature
    log_p_t = F.log_softmax(z_t, dim=-1)
    if teacher_logits.requires_grad:
        log_p_s = F.log_softmax(z_s.float(), dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    else:
        kl = _SoftTargetKL.apply(z_s, log_p_t)
    return kl * (temperature**2)


class _SoftTargetKL(torch.autograd.Function):
    """(1/N) Σ_n Σ_v p_T (log p_T − log p_S) from student logits and fixed teacher log-probs.

    Forward: one log-softmax of the student, one difference, one product-sum (kept elementwise,
    not a BLAS dot, whose serial accumulation over millions of terms lost 1e-4 relative).
    Backward: ∂L/∂z_S = (softmax(z_S) − p_T)/N, two passes, instead of autograd's chain through
    kl_div and log_softmax. Saved tensors are not modified, so a retained graph can be
    differentiated again (per-term attribution does).
    """

    @staticmethod
    def forward(ctx, z_s: Tensor, log_p_t: Tensor) -> Tensor:
        log_p_s = F.log_softmax(z_s.float(), dim=-1)
        p_t = log_p_t.exp()
        kl = (p_t * (log_p_t - log_p_s)).sum() / z_s.shape[0]
        ctx.save_for_backward(log_p_s, p_t)
        ctx.dtype = z_s.dtype
        return kl

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        log_p_s, p_t = ctx.saved_tensors
        g = log_p_s.exp().sub_(p_t).mul_(grad / log_p_s.shape[0])
        return g.to(ctx.dtype), None


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Hidden-state / embedding loss of TinyBERT (Jiao et al. 2020, "TinyBERT: Distilling BERT
    for Natural Language Understanding"), restricted to real tokens.

        L = Σ_{b,l} m_bl · ||s_bl − t_bl||² / (D · Σ_{b,l} m_bl)

    Args:
        student: [B, L, D], already projected to the teacher's width D by the caller.
        teacher: [B, L, D].
        mask: [B, L], 1 for real tokens and 0 for padding; None when every token is real.

    Returns:
        A float32 scalar; zero (with a grad path) when the mask is empty.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher hidden states differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}; project the student first"
        )
    if mask is None:  # every position real (packed blocks): one fused kernel, no selection
        return F.mse_loss(student.float(), teacher.float())
    keep = mask.to(device=student.device, dtype=torch.bool).unsqueeze(-1)
    diff = student.float() - teacher.float()
    # where, not multiply, and before squaring: padded positions may hold inf/nan, and both
    # inf * 0 and the backward of square() through a discarded inf give nan.
    total = torch.where(keep, diff, diff.new_zeros(())).square().sum()
    count = keep.sum() * student.shape[-1]
    return total / count.clamp(min=1)


def attention_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Attention loss of TinyBERT (Jiao et al. 2020), restricted to real (query, key) pairs.

        L = (1/H) Σ_h Σ_{b,i,j} M_bij · (A^S_bhij − A^T_bhij)² / Σ_{b,i,j} M_bij,
        M_bij = m_bi · m_bj

    Works for probabilities or pre-softmax scores (the paper uses the unnormalised scores).

    Args:
        student: [B, H, L, L] student attention maps.
        teacher: [B, H, L, L] teacher attention maps with the same number of heads.
        mask: [B, L], 1 for real tokens and 0 for padding; None when every token is real.

    Returns:
        A float32 scalar; finite even if masked-out entries hold -inf (as masked scores do).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher attention maps differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    if mask is None:  # every pair real (packed blocks): one fused kernel, no selection
        return F.mse_loss(student.float(), teacher.float())
    m = mask.to(device=student.device, dtype=torch.bool)
    pair = m[:, None, :, None] & m[:, None, None, :]
    diff = student.float() - teacher.float()
    # Select before squaring: -inf - -inf = nan on masked keys, nan * 0 is still nan, and
    # square()'s backward through a discarded nan would poison the gradient.
    sq = torch.where(pair, diff, diff.new_zeros(())).square()
    count = pair.sum() * student.shape[1]
    return sq.sum() / count.clamp(min=1)


def _real(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(device=like.device, dtype=torch.bool)


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Cosine hidden-state loss of DistilBERT (Sanh et al. 2019, "DistilBERT, a distilled version
    of BERT: smaller, faster, cheaper and lighter"), restricted to real tokens.

        L = Σ_{b,l} m_bl · (1 − cos(s_bl, t_bl)) / Σ_{b,l} m_bl,
        cos(s, t) = s·t / max(‖s‖·‖t‖, ε)

    Args:
        student: [B, L, D], already projected to the teacher's width D by the caller.
        teacher: [B, L, D].
        mask: [B, L], 1 for real tokens and 0 for padding.

    Returns:
        A float32 scalar in [0, 2]; zero (with a grad path) when the mask is empty.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher hidden states differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}; project the student first"
        )
    keep = _real(mask, student).unsqueeze(-1)
    # Zero the padding before any arithmetic: it may hold inf/nan (see hidden_mse).
    s = torch.where(keep, student.float(), 0.0)
    t = torch.where(keep, teacher.float(), 0.0)
    norms = (s.square().sum(-1) * t.square().sum(-1)).clamp(min=1e-16).sqrt()
    cos = (s * t).sum(-1) / norms
    real = keep.squeeze(-1)
    return torch.where(real, 1.0 - cos, 0.0).sum() / real.sum().clamp(min=1)


def attention_kl(student: Tensor, teacher: Tensor, mask: Tensor | None = None, *,
                 causal: bool = False, probs: bool = False) -> Tensor:  # fmt: skip
    """Self-attention distribution transfer of MiniLM (Wang et al. 2020, "MiniLM: Deep
    Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers"),
    restricted to the keys each query may see.

        L = (1/(H · N)) Σ_h Σ_{b,i: m_bi=1} Σ_{j ∈ K(b,i)} A^T_bhij · log(A^T_bhij / A^S_bhij)

    K(b, i) are row b's real keys (``mask``), and only j ≤ i when ``causal``; N = Σ_{b,i} m_bi.
    An encoder (the MLM family) gives pre-softmax scores, normalised here over K; a decoder's
    eager attention gives probabilities (``probs``), already zero outside K.

    Args:
        student: [B, H, L, L] pre-softmax logits (attention scores, or value-relation logits),
            or probabilities when ``probs``.
        teacher: [B, H, L, L] the same, with the same number of heads.
        mask: [B, L], 1 for real tokens and 0 for padding; None when every token is real.
        causal: keys after the query are left out (a decoder's map is 0 there).
        probs: the maps are probabilities rather than logits.

    Returns:
        A float32 scalar; zero (with a grad path) when the mask is empty.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher attention maps differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)} (the attention term compares "
            "heads one to one: it needs equal head counts)"
        )
    length = student.shape[-1]
    m = None if mask is None else _real(mask, student)
    keep = torch.ones(1, 1, 1, length, dtype=torch.bool, device=student.device)
    if m is not None:
        keep = m[:, None, None, :]
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=student.device).tril()
    if probs:
        tiny = torch.finfo(torch.float32).tiny
        p_t = teacher.float()
        # clamp, not +eps: inside K the probabilities are > 0 and stay exact; the clamp only
        # meets the zeros outside it, which the where() below drops (their gradient is 0).
        log_t, log_s = p_t.clamp_min(tiny).log(), student.float().clamp_min(tiny).log()
    else:
        low = torch.finfo(torch.float32).min
        log_s = torch.log_softmax(student.float().masked_fill(~keep, low), dim=-1)
        log_t = torch.log_softmax(teacher.float().masked_fill(~keep, low), dim=-1)
        p_t = log_t.exp()
    # Select before multiplying: differences of the fill value are not meaningful numbers.
    kl = torch.where(keep, p_t * (log_t - log_s), 0.0).sum(-1)  # [B, H, L]
    if m is None:
        return kl.mean()
    query = m[:, None, :]
    count = m.sum() * student.shape[1]
    return torch.where(query, kl, 0.0).sum() / count.clamp(min=1)


def value_relation_kl(
    student_values: Tensor, teacher_values: Tensor, num_heads: int, mask: Tensor
) -> Tensor:
    """Value-relation transfer of MiniLM (Wang et al. 2020), restricted to real tokens.

        VR = softmax(V_h · V_hᵀ / √d_h) per head h,
        L = (1/(H · N)) Σ_h Σ_{b,i: m_bi=1} KL(VR^T_bhi ‖ VR^S_bhi)

    The relation is [L, L] per head whatever the head width d_h, so student and teacher may
    differ in width but not in head count.

    Args:
        student_values: [B, L, H·d_S] the student's value projections (``attention.self.value``).
        teacher_values: [B, L, H·d_T] the teacher's.
        num_heads: H, shared by both.
        mask: [B, L], 1 for real tokens and 0 for padding.
    """
    rel_s = attention_scores(student_values, student_values, num_heads, mask)
    rel_t = attention_scores(teacher_values, teacher_values, num_heads, mask)
    return attention_kl(rel_s, rel_t, mask)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Sentence representations: [B, L, D] states averaged over each row's real tokens -> [B, D]
    (float32; a row without real tokens gives zeros)."""
    keep = _real(mask, hidden).unsqueeze(-1)
    total = torch.where(keep, hidden.float(), 0.0).sum(1)
    return total / keep.sum(1).clamp(min=1)


def _pairwise_distances(x: Tensor) -> Tensor:
    # Differences, not the ‖a‖² + ‖b‖² − 2ab expansion, which cancels badly for close points;
    # the clamp keeps sqrt's gradient finite where two points coincide (the diagonal).
    return (x[:, None, :] - x[None, :, :]).square().sum(-1).clamp(min=1e-12).sqrt()


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise relational KD of Park et al. 2019, "Relational Knowledge Distillation".

        ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ,   μ = mean_{i≠j} ‖x_i − x_j‖₂
        L = mean_{i≠j} ℓ_δ(ψ_D(s_i, s_j), ψ_D(t_i, t_j)),   ℓ_δ = Huber (smooth-L1, δ = 1)

    Normalising by μ makes the loss independent of each space's scale, so student and teacher
    widths may differ and no projection is needed.

    Args:
        student: [N, D_S] one representation per example (e.g. :func:`mean_pool`).
        teacher: [N, D_T] the teacher's, for the same N examples.

    Returns:
        A float32 scalar; zero (with a grad path) when N < 2.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{student.shape[0]} student vs {teacher.shape[0]} teacher examples")
    n = student.shape[0]
    if n < 2:
        return student.float().sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    d_s = _pairwise_distances(student.float())[off]
    d_t = _pairwise_distances(teacher.float())[off]
    return F.smooth_l1_loss(
        d_s / d_s.mean().clamp(min=1e-12), d_t / d_t.mean().clamp(min=1e-12), beta=1.0
    )


def _angles(x: Tensor) -> Tensor:
    # a[j, i, k] = cos of the angle at x_j between x_i and x_k.
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=-1)  # e[j, i] = unit(x_i − x_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise relational KD of Park et al. 2019, "Relational Knowledge Distillation".

        ψ_A(x_i, x_j, x_k) = ⟨e_ij, e_kj⟩,   e_ij = (x_i − x_j) / ‖x_i − x_j‖₂
        L = mean over distinct (i, j, k) of ℓ_δ(ψ_A(s_i, s_j, s_k), ψ_A(t_i, t_j, t_k))

    with ℓ_δ the Huber (smooth-L1, δ = 1) loss. Angles are scale-free, so no projection is
    needed. Only triplets of three distinct examples count (the paper's code also averages the
    degenerate ones, which are 0 or 1 on both sides).

    Args:
        student: [N, D_S] one representation per example.
        teacher: [N, D_T].

    Returns:
        A float32 scalar; zero (with a grad path) when N < 3.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{student.shape[0]} student vs {teacher.shape[0]} teacher examples")
    n = student.shape[0]
    if n < 3:
        return student.float().sum() * 0.0
    idx = torch.arange(n, device=student.device)
    distinct = (
        (idx[:, None, None] != idx[None, :, None])
        & (idx[:, None, None] != idx[None, None, :])
        & (idx[None, :, None] != idx[None, None, :])
    )
    a_s = _angles(student.float())[distinct]
    a_t = _angles(teacher.float())[distinct]
    return F.smooth_l1_loss(a_s, a_t, beta=1.0)


def activation_boundary(student: Tensor, teacher: Tensor, mask: Tensor, margin: float) -> Tensor:
    """Activation-boundary transfer of Heo et al. 2019, "Knowledge Transfer via Distillation of
    Activation Boundaries Formed by Hidden Neurons", restricted to real tokens.

        L = Σ_{b,l: m_bl=1} Σ_f [ ρ(μ − s_blf)² · 1[t_blf > 0] + ρ(μ + s_blf)² · 1[t_blf ≤ 0] ]
            / (F · Σ_{b,l} m_bl),   ρ = relu

    A hinge on the student's pre-activations: each neuron is pushed at least μ past zero on
    the side where the teacher's neuron is active (t > 0) or not, so the student copies which
    neurons fire rather than how strongly.

    Args:
        student: [B, L, F] pre-activations, already mapped to the teacher's width F.
        teacher: [B, L, F] the teacher's pre-activations (only their signs count).
        mask: [B, L], 1 for real tokens and 0 for padding.
        margin: μ > 0.

    Returns:
        A float32 scalar; zero (with a grad path) when the mask is empty.
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher pre-activations differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}; map the student first"
        )
    keep = _real(mask, student).unsqueeze(-1)
    s = torch.where(keep, student.float(), 0.0)
    on = teacher > 0
    hinge = torch.where(on, F.relu(margin - s), F.relu(margin + s)).square()
    count = keep.sum() * student.shape[-1]
    return torch.where(keep, hinge, 0.0).sum() / count.clamp(min=1)
