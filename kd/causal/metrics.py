"""Held-out scores for causal LMs, per batch: what the original study's per-batch figures plot.

At each position t that has a real next token (both t and t + 1 unmasked), a causal LM predicts
token t + 1. Per batch, summed over those positions so batches of any size combine exactly:

- ``nll``: −log q(x_{t+1}), the student's negative log-likelihood; perplexity is
  exp(Σ nll / Σ count) over the split;
- ``teacher_nll``: the same for the teacher;
- ``kl_t1``: KL(p ‖ q) at T = 1 over the whole vocabulary (Hinton et al. 2015's soft-target
  divergence, without temperature);
- ``agree``: 1 where the student's and the teacher's most likely next token are the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kd.causal.divergences import forward_kl, log_probs


def next_token_positions(attention_mask: Tensor) -> Tensor:
    """[B, L − 1] bool: positions t whose next token t + 1 is real (right or left padding)."""
    m = attention_mask.bool()
    return m[:, :-1] & m[:, 1:]


@torch.no_grad()
def batch_scores(
    student_logits: Tensor, teacher_logits: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> dict[str, float]:
    """Sums over one batch's predicting positions (see the module docstring) and their count."""
    keep = next_token_positions(attention_mask)
    target = input_ids[:, 1:][keep]
    lq = log_probs(student_logits[:, :-1][keep])
    lp = log_probs(teacher_logits[:, :-1][keep])
    return {
        "count": int(keep.sum()),
        "nll": float(-lq.gather(-1, target[:, None]).sum()),
        "teacher_nll": float(-lp.gather(-1, target[:, None]).sum()),
        "kl_t1": float(forward_kl(lp, lq).sum()),
        "agree": float((lq.argmax(-1) == lp.argmax(-1)).sum()),
    }


def summarize(batches: list[dict[str, float]]) -> dict[str, float]:
    """Per-position means over batches, and both perplexities."""
    count = sum(b["count"] for b in batches)
    if count == 0:
        raise ValueError("no position with a next token to score")
    mean = {k: sum(b[k] for b in batches) / count for k in ("nll", "teacher_nll", "kl_t1", "agree")}
    return {
        "perplexity": math.exp(mean["nll"]),
        "teacher_perplexity": math.exp(mean["teacher_nll"]),
        "kl_t1": mean["kl_t1"],
        "top1_agreement": mean["agree"],
        "positions": count,
    }
