"""Distillation losses as pure functions of tensors.

Every reduction runs in float32: bf16 has an 8-bit mantissa, so sums over a vocabulary or over
every (query, key) pair lose most of their precision if accumulated in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature**2)


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Hidden-state / embedding loss of TinyBERT (Jiao et al. 2020, "TinyBERT: Distilling BERT
    for Natural Language Understanding"), restricted to real tokens.

        L = Σ_{b,l} m_bl · ||s_bl − t_bl||² / (D · Σ_{b,l} m_bl)

    Args:
        student: [B, L, D], already projected to the teacher's width D by the caller.
        teacher: [B, L, D].
        mask: [B, L], 1 for real tokens and 0 for padding.

    Returns:
        A float32 scalar; zero (with a grad path) when the mask is empty.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher hidden states differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}; project the student first"
        )
    keep = mask.to(device=student.device, dtype=torch.bool).unsqueeze(-1)
    diff = student.float() - teacher.float()
    # where, not multiply, and before squaring: padded positions may hold inf/nan, and both
    # inf * 0 and the backward of square() through a discarded inf give nan.
    total = torch.where(keep, diff, diff.new_zeros(())).square().sum()
    count = keep.sum() * student.shape[-1]
    return total / count.clamp(min=1)


def attention_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Attention loss of TinyBERT (Jiao et al. 2020), restricted to real (query, key) pairs.

        L = (1/H) Σ_h Σ_{b,i,j} M_bij · (A^S_bhij − A^T_bhij)² / Σ_{b,i,j} M_bij,
        M_bij = m_bi · m_bj

    Works for probabilities or pre-softmax scores (the paper uses the unnormalised scores).

    Args:
        student: [B, H, L, L] student attention maps.
        teacher: [B, H, L, L] teacher attention maps with the same number of heads.
        mask: [B, L], 1 for real tokens and 0 for padding.

    Returns:
        A float32 scalar; finite even if masked-out entries hold -inf (as masked scores do).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher attention maps differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    m = mask.to(device=student.device, dtype=torch.bool)
    pair = m[:, None, :, None] & m[:, None, None, :]
    diff = student.float() - teacher.float()
    # Select before squaring: -inf - -inf = nan on masked keys, nan * 0 is still nan, and
    # square()'s backward through a discarded nan would poison the gradient.
    sq = torch.where(pair, diff, diff.new_zeros(())).square()
    count = pair.sum() * student.shape[1]
    return sq.sum() / count.clamp(min=1)
