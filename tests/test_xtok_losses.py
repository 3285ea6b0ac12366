"""Cross-tokenizer losses (kd.causal.xtok.losses): ULD and the mapped divergence, against
values worked on paper, the same-tokenizer reference, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from kd.causal import divergences as D
from kd.causal.xtok.losses import (
    mapped_loss,
    mapped_per_position,
    mapped_supports,
    uld_loss,
    uld_per_position,
)
from kd.causal.xtok.vocab_map import build_vocab_map

F64 = torch.float64
NAMES = list(D.DIVERGENCES)


def _topk(ids, probs, rest=None) -> D.TopK:
    return D.TopK(
        torch.tensor(ids),
        torch.tensor(probs, dtype=F64).log(),
        None if rest is None else torch.tensor(rest, dtype=F64).log(),
    )


def _logits(*probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=F64).log()


# --- Mapped divergence --------------------------------------------------------------------------

# Teacher vocabulary: 0 "a", 1 "ab", 2 "b", 3 "c", 4 EOS.  Student: 0 "a", 1 "b", 2 "d".
# Map: a → a (exact), ab → a (prefix), b → b (exact), c and EOS → leftover.
HAND_MAP = build_vocab_map([b"a", b"ab", b"b", b"c", "<eos>"], [b"a", b"b", b"d"])
# Row 0: ab 0.4, a 0.3, c 0.2, rest 0.1.  Row 1: b 0.5, a 0.25, ab 0.15, rest 0.1.
HAND_TOPK = _topk([[1, 0, 3], [2, 0, 1]], [[0.4, 0.3, 0.2], [0.5, 0.25, 0.15]], [0.1, 0.1])
# The student's distribution at T = 1 on (a, b, d), the same at both positions.
HAND_STUDENT = _logits([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])


def test_mapped_supports_by_hand() -> None:
    p, q = mapped_supports(HAND_STUDENT, HAND_TOPK, HAND_MAP)
    # Row 0: ab and a both land on student "a" → 0.4 + 0.3 = 0.7 in slot 0 (the first slot of
    # the two), slot 1 empty; c is leftover → its 0.2 joins the rest 0.1 in the extra bin.
    # The student: q(a) = 0.5 in slot 0; its mass off {a}, 0.25 + 0.25, in the extra bin.
    # Row 1: b → slot 0 (0.5); a and ab → slot 1 (0.25 + 0.15 = 0.4); slot 2 empty; extra 0.1.
    # The student: q(b) = 0.25, q(a) = 0.5, off {a, b}: q(d) = 0.25.
    expected_p = [[0.7, 0.0, 0.0, 0.3], [0.5, 0.4, 0.0, 0.1]]
    expected_q = [[0.5, 0.0, 0.0, 0.5], [0.25, 0.5, 0.0, 0.25]]
    assert torch.allclose(p.exp(), torch.tensor(expected_p, dtype=F64), atol=1e-15)
    assert torch.allclose(q.exp(), torch.tensor(expected_q, dtype=F64), atol=1e-15)


def test_mapped_loss_by_hand() -> None:
    fkl0 = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    fkl1 = 0.5 * math.log(0.5 / 0.25) + 0.4 * math.log(0.4 / 0.5) + 0.1 * math.log(0.1 / 0.25)
    rkl0 = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    rkl1 = 0.25 * math.log(0.25 / 0.5) + 0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.1)
    tv0 = 0.5 * (0.2 + 0.2)
    tv1 = 0.5 * (0.25 + 0.1 + 0.15)
    for name, rows in [
        ("forward_kl", (fkl0, fkl1)),
        ("reverse_kl", (rkl0, rkl1)),
        ("tv", (tv0, tv1)),
    ]:
        got = mapped_per_position(HAND_STUDENT, HAND_TOPK, HAND_MAP, D.divergence(name))
        assert got.tolist() == pytest.approx(rows, abs=1e-14), name
        loss = mapped_loss(HAND_STUDENT, HAND_TOPK, HAND_MAP, D.divergence(name))
        assert loss.item() == pytest.approx(sum(rows) / 2, abs=1e-14), name


def test_mapped_loss_temperature_by_hand() -> None:
    # At T = 2 the student's probabilities are ∝ √q = (√½, ½, ½): normalised,
    # q(a) = √2 − 1, q(b) = q(d) = 1 − 1/√2.  The teacher's cached values stay as they are.
    qa, qb = math.sqrt(2) - 1, 1 - 1 / math.sqrt(2)
    row0 = 0.7 * math.log(0.7 / qa) + 0.3 * math.log(0.3 / (2 * qb))
    row1 = 0.5 * math.log(0.5 / qb) + 0.4 * math.log(0.4 / qa) + 0.1 * math.log(0.1 / qb)
    got = mapped_loss(HAND_STUDENT, HAND_TOPK, HAND_MAP, D.forward_kl, temperature=2.0)
    assert got.item() == pytest.approx(4 * (row0 + row1) / 2, abs=1e-13)  # T² = 4


def _identity_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    vocab = 12
    pieces = [bytes([97 + i]) for i in range(vocab)]
    vmap = build_vocab_map(pieces, pieces)
    teacher = torch.randn(5, vocab, generator=g, dtype=F64) * 2
    student = torch.randn(5, vocab, generator=g, dtype=F64) * 2
    return vmap, teacher, student


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identity_map_is_next_token_loss_exactly(name, temperature) -> None:
    vmap, teacher, student = _identity_case(seed=1)
    assert torch.equal(vmap.student_ids, torch.arange(12))
    topk = D.top_k(teacher, 4, temperature)
    div = D.divergence(name)
    want = D.next_token_loss(student, topk, div, temperature)
    got = mapped_loss(student, topk, vmap, div, temperature)
    assert torch.equal(got, want), (got.item(), want.item())


@pytest.mark.parametrize("name", NAMES)
def test_identity_map_on_the_whole_vocabulary(name) -> None:
    # k = V: no rest bin in the reference; here the extra bin is empty on both sides and counts 0
    # (a sum one term longer, so equal to rounding rather than bit for bit).
    vmap, teacher, student = _identity_case(seed=2)
    topk = D.top_k(teacher, 12)
    div = D.divergence(name)
    got = mapped_loss(student, topk, vmap, div)
    assert torch.allclose(got, D.next_token_loss(student, topk, div), rtol=1e-13, atol=0)
    student.requires_grad_(True)
    mapped_loss(student, topk, vmap, div).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_mapped_loss_gradcheck(name) -> None:
    # Duplicates (ab and a share a student id), a leftover and a rest bin, at T = 1.5.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    div = D.divergence(name)
    assert torch.autograd.gradcheck(
        lambda z: mapped_loss(z, HAND_TOPK, HAND_MAP, div, 1.5), (logits,)
    )


def test_mapped_loss_refuses_a_map_for_another_vocabulary() -> None:
    with pytest.raises(ValueError, match="student ids"):
        mapped_loss(torch.zeros(2, 4, dtype=F64), HAND_TOPK, HAND_MAP, D.forward_kl)
    with pytest.raises(ValueError, match="temperature"):
        mapped_loss(HAND_STUDENT, HAND_TOPK, HAND_MAP, D.forward_kl, 0.0)


# --- ULD ----------------------------------------------------------------------------------------


def test_uld_by_hand() -> None:
    teacher = _topk([[7, 2, 9]], [[0.4, 0.3, 0.2]], [0.1])  # ids do not matter to ULD
    # Student vocabulary of 3, q = (0.25, 0.5, 0.25): sorted (0.5, 0.25, 0.25), no tail.
    # |0.4 − 0.5| + |0.3 − 0.25| + |0.2 − 0.25| = 0.2; with the rest, + |0.1 − 0| = 0.3.
    small = _logits([0.25, 0.5, 0.25])
    assert uld_per_position(small, teacher, include_rest=False).item() == pytest.approx(
        0.2, abs=1e-15
    )
    assert uld_per_position(small, teacher).item() == pytest.approx(0.3, abs=1e-15)
    # Student vocabulary of 5, q = (0.1, 0.4, 0.2, 0.2, 0.1): top 3 sorted (0.4, 0.2, 0.2),
    # tail 0.2.  0 + 0.1 + 0 = 0.1; with the rest, + |0.1 − 0.2| = 0.2.
    big = _logits([0.1, 0.4, 0.2, 0.2, 0.1])
    assert uld_per_position(big, teacher, include_rest=False).item() == pytest.approx(
        0.1, abs=1e-15
    )
    assert uld_per_position(big, teacher).item() == pytest.approx(0.2, abs=1e-15)
    # A whole teacher vocabulary of 3, (0.5, 0.3, 0.2), against a student of 2, (0.75, 0.25):
    # the student is padded with a zero, |0.5 − 0.75| + |0.3 − 0.25| + |0.2 − 0| = 0.5.
    full = _topk([[0, 1, 2]], [[0.5, 0.3, 0.2]])
    assert uld_per_position(_logits([0.25, 0.75]), full).item() == pytest.approx(0.5, abs=1e-15)
    # Two rows, T = 2: the mean times T².
    both = D.TopK(teacher.ids.repeat(2, 1), teacher.logprobs.repeat(2, 1), teacher.rest.repeat(2))
    two = torch.cat([small, small]) * 2  # at T = 2 these logits give q back
    assert uld_loss(two, both, temperature=2.0).item() == pytest.approx(4 * 0.3, abs=1e-14)


def test_uld_on_a_whole_teacher_vocabulary_is_the_papers_loss() -> None:
    # The paper's ULD on full vocabularies V_t = 4 < V_s = 6: sort both, pad the teacher
    # with zeros, L1. With rest = None the loss must be that exactly.
    g = torch.Generator().manual_seed(4)
    teacher_logits = torch.randn(3, 4, generator=g, dtype=F64)
    student_logits = torch.randn(3, 6, generator=g, dtype=F64)
    p = teacher_logits.softmax(-1).sort(-1, descending=True).values
    q = student_logits.softmax(-1).sort(-1, descending=True).values
    paper = (torch.cat([p, torch.zeros(3, 2, dtype=F64)], -1) - q).abs().sum(-1)
    got = uld_per_position(student_logits, D.top_k(teacher_logits, 4))
    assert torch.allclose(got, paper, atol=1e-14)


def test_uld_is_zero_only_for_equal_sorted_distributions() -> None:
    # A permutation of the same probabilities is distance 0 (ULD ignores which token is which).
    teacher = _topk([[0, 1, 2]], [[0.5, 0.3, 0.2]])
    assert uld_per_position(_logits([0.2, 0.5, 0.3]), teacher).item() == pytest.approx(0, abs=1e-15)
    assert uld_per_position(_logits([0.3, 0.4, 0.3]), teacher).item() > 0


def test_uld_gradcheck() -> None:
    g = torch.Generator().manual_seed(5)
    teacher = D.top_k(torch.randn(3, 9, generator=g, dtype=F64), 4)
    for vocab in (3, 7):  # smaller than k (padding) and larger (a student tail)
        logits = torch.randn(3, vocab, generator=g, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z: uld_loss(z, teacher, 1.5), (logits,))
