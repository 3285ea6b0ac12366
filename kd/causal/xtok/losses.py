"""Next-token losses between a teacher and a student that do not share a vocabulary.

Both take the teacher as its cached :class:`~kd.causal.divergences.TopK` support and the student
as logits [N, V_student], row n of each at the same aligned position
(:func:`kd.causal.xtok.align.compared_positions`), and return T² · (1/N) · Σ_n loss_n — the
scaling of :func:`kd.causal.divergences.next_token_loss`, so switching between the same- and
cross-tokenizer losses, or changing T, does not rescale the gradient. The teacher's log-probs
are already at temperature T (the cache takes them there); T is applied to the student here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.causal.divergences import Divergence, TopK, check_temperature, log_probs, top_k
from kd.causal.xtok.vocab_map import VocabMap


def _at_least_float32(t: Tensor) -> Tensor:
    # Sums over a vocabulary lose most of their precision in bf16 (as in divergences.py).
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --- ULD ----------------------------------------------------------------------------------------


def uld_per_position(
    student_logits: Tensor, teacher: TopK, temperature: float = 1.0, include_rest: bool = True
) -> Tensor:
    """The Universal Logit Distillation distance of Boizard et al. 2024, "Towards
    Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs", per position
    [N]. Sorting makes the two distributions comparable without any token correspondence:

        ULD(p, q) = Σ_i |p_(i) − q_(i)|

    with p_(1) ≥ p_(2) ≥ … the teacher's probabilities sorted, q_(i) the student's, the shorter
    padded with zeros — the closed form of their Wasserstein-1 under a uniform cost.

    The teacher is known on its top k only, so both sides are cut at k: the teacher's k cached
    probabilities against the student's k' = min(k, V_student) largest (zeros pad the student
    to k when its vocabulary is smaller). With ``include_rest`` the two tails add one term,
    |P_rest − Q_rest|, the mass each puts outside its own top k: by the triangle inequality it
    is a lower bound on the tail terms Σ_{i>k} |p_(i) − q_(i)| the cut drops, it keeps the
    student from hiding mass in its tail, and when the teacher is the whole vocabulary
    (``rest`` None, V_teacher ≤ V_student) it is exactly the paper's zero-padding term, so the
    loss is then exactly ULD.
    """
    check_temperature(temperature)
    k = teacher.logprobs.shape[-1]
    vocab = student_logits.shape[-1]
    p = _at_least_float32(teacher.logprobs).exp().sort(-1, descending=True).values
    student = top_k(student_logits, min(k, vocab), temperature)  # sorted, with its own rest
    q = F.pad(student.logprobs.exp(), (0, k - student.logprobs.shape[-1]))
    dist = (p - q.to(p.dtype)).abs().sum(-1)
    if include_rest:
        p_rest = torch.zeros_like(dist) if teacher.rest is None else teacher.rest.to(p.dtype).exp()
        q_rest = torch.zeros_like(dist) if student.rest is None else student.rest.to(p.dtype).exp()
        dist = dist + (p_rest - q_rest).abs()
    return dist


def uld_loss(
    student_logits: Tensor, teacher: TopK, temperature: float = 1.0, include_rest: bool = True
) -> Tensor:
    """T² · (1/N) · Σ_n ULD(p_n, q_n); see :func:`uld_per_position`.

    T² is kept for one scaling across every loss. Hinton's argument for it is about KL, whose
    gradient in the logits shrinks as 1/T²; an L1 distance's shrinks only as 1/T, so at T > 1
    this ULD's gradient grows with T. Weigh it against the mapped loss at the T it will run at.
    """
    return (
        uld_per_position(student_logits, teacher, temperature, include_rest).mean() * temperature**2
    )


# --- Mapped divergence --------------------------------------------------------------------------


def _canonical_slots(student_ids: Tensor) -> Tensor:
    """For each top-k slot, the first slot of its row mapped to the same student id (itself
    when none before it is), and k — the extra bin — for a leftover; [N, k]. The [N, k, k]
    comparison is k times the cache's size, small next to the student's [N, V] logits."""
    k = student_ids.shape[-1]
    valid = student_ids >= 0
    same = (student_ids[:, :, None] == student_ids[:, None, :]) & valid[:, None, :]
    first = same.to(torch.uint8).argmax(-1)  # argmax returns the first of equal maxima
    return torch.where(valid, first, torch.full_like(first, k))


def _scatter_logsumexp(values: Tensor, index: Tensor, bins: int) -> Tensor:
    """log Σ exp(values) per bin, in log space so a bin holding one value returns it bit for bit
    (the identity-map test relies on this); an empty bin is −inf."""
    top = torch.full(
        (*values.shape[:-1], bins), float("-inf"), dtype=values.dtype, device=values.device
    ).scatter_reduce(-1, index, values, "amax")
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    summed = torch.zeros_like(top).scatter_add(-1, index, (values - shift.gather(-1, index)).exp())
    return summed.log() + shift


def mapped_supports(
    student_logits: Tensor, teacher: TopK, vmap: VocabMap, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The teacher's and the student's log-probabilities on one shared support, [N, k + 1] each.

    Bin j < k is slot j's student token s_j = map(t_j); teacher slots mapped to the same s add
    their mass in the first such slot's bin and leave theirs empty (−inf on both sides, which
    every divergence counts 0). Bin k, the extra bin, holds on the teacher's side its rest (the
    mass outside its top k) and the mass of leftover tokens; on the student's side all its mass
    off the mapped ids. Both rows are proper distributions, so any divergence applies.

    Rows must be aligned positions already (``compared_positions``). One degenerate case: if a
    row's mapped ids are the student's whole vocabulary (a toy vocabulary smaller than k), the
    student's extra bin is empty, and teacher mass there makes forward KL infinite — true to
    the projection, since the student cannot put mass where the teacher does.
    """
    vocab = student_logits.shape[-1]
    if vmap.student_size != vocab:
        raise ValueError(
            f"the map targets {vmap.student_size} student ids, the logits have {vocab}"
        )
    k = teacher.ids.shape[-1]
    sid = vmap.student_ids.to(teacher.ids.device)[teacher.ids]
    valid = sid >= 0
    slot = _canonical_slots(sid)

    lp = _at_least_float32(teacher.logprobs)
    t_bins = _scatter_logsumexp(lp, slot, k + 1)
    if teacher.rest is not None:
        t_bins = torch.cat(
            [t_bins[:, :k], torch.logaddexp(t_bins[:, k:], teacher.rest.to(lp.dtype)[:, None])], -1
        )

    lq = log_probs(student_logits, temperature)
    safe = sid.clamp(min=0)
    own = slot == torch.arange(k, device=slot.device)  # a non-empty bin of a mapped token
    picked = torch.where(own, lq.gather(-1, safe), lq.new_full(sid.shape, float("-inf")))
    used = torch.zeros_like(lq).scatter_add(-1, safe, valid.to(lq.dtype)) > 0
    # A row whose mapped ids are the whole student vocabulary has nothing off them: −inf, and
    # the where keeps the empty log-sum-exp's NaN gradient out.
    full = used.all(-1, keepdim=True)
    off = torch.where(full, torch.zeros_like(lq), lq).masked_fill(used & ~full, float("-inf"))
    other = torch.where(full[:, 0], torch.full_like(off[:, 0], float("-inf")), off.logsumexp(-1))
    return t_bins, torch.cat([picked, other[:, None]], -1)


def mapped_per_position(
    student_logits: Tensor,
    teacher: TopK,
    vmap: VocabMap,
    div: Divergence,
    temperature: float = 1.0,
) -> Tensor:
    """D(p̃_n, q̃_n) per position [N], p̃ and q̃ the supports of :func:`mapped_supports` and D
    any divergence of :mod:`kd.causal.divergences` (``divergence(name)``).

    This is the projection behind vocabulary-mapping cross-tokenizer distillation (the "hybrid"
    of TRL's GOLD trainer compares matched tokens directly): with the teacher's mass moved onto
    student ids the usual same-vocabulary divergences apply, and with one tokenizer on both
    sides (the identity map) it is exactly :func:`~kd.causal.divergences.next_token_loss`.
    """
    check_temperature(temperature)
    p, q = mapped_supports(student_logits, teacher, vmap, temperature)
    return div(p, q)


def mapped_loss(
    student_logits: Tensor,
    teacher: TopK,
    vmap: VocabMap,
    div: Divergence,
    temperature: float = 1.0,
) -> Tensor:
    """T² · (1/N) · Σ_n D(p̃_n, q̃_n); see :func:`mapped_per_position`."""
    return (
        mapped_per_position(student_logits, teacher, vmap, div, temperature).mean() * temperature**2
    )
