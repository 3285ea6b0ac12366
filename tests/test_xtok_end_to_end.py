"""The xtok pieces used together as a training step will: two tokenizers, one text, aligned
positions, the teacher's cached top-k mapped onto the student's vocabulary, both losses."""

from __future__ import annotations

import torch

from kd.causal import divergences as D
from kd.causal.xtok.align import align, compared_positions
from kd.causal.xtok.coverage import coverage
from kd.causal.xtok.losses import mapped_loss, uld_loss
from kd.causal.xtok.pieces import byte_ends, vocab_pieces
from kd.causal.xtok.tokenizer import train_byte_bpe
from kd.causal.xtok.vocab_map import vocab_map


def test_one_step_from_text_to_both_losses() -> None:
    corpus = ["the river runs past the old mill and the river bends at the mill"] * 4
    teacher_tok = train_byte_bpe(corpus, vocab_size=300)
    student_tok = train_byte_bpe(corpus[:1], vocab_size=270)
    text = "the river bends past the mill"
    t_ids, s_ids = teacher_tok(text)["input_ids"], student_tok(text)["input_ids"]
    assert t_ids != s_ids  # the two tokenizers really differ here
    groups = align(
        byte_ends(vocab_pieces(teacher_tok), t_ids), byte_ends(vocab_pieces(student_tok), s_ids)
    )
    t_pos, s_pos = compared_positions(groups, include_last=False)

    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(len(t_ids), len(teacher_tok), generator=g)
    student_logits = torch.randn(len(s_ids), len(student_tok), generator=g, requires_grad=True)
    cache = D.top_k(teacher_logits[t_pos], 16, temperature=2.0)
    vmap = vocab_map(teacher_tok, student_tok)

    report = coverage(vmap, cache)
    total = report.exact + report.prefix + report.leftover + report.rest
    assert abs(total - 1) < 1e-5 and report.leftover == 0.0  # a byte-level student takes all

    for loss_fn in (
        lambda rows: mapped_loss(rows, cache, vmap, D.divergence("jsd"), temperature=2.0),
        lambda rows: uld_loss(rows, cache, temperature=2.0),
    ):
        loss = loss_fn(student_logits[s_pos])
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
        (grad,) = torch.autograd.grad(loss, student_logits)
        # Only the compared positions get a gradient.
        others = torch.ones(len(s_ids), dtype=torch.bool)
        others[s_pos] = False
        assert grad[others].abs().sum() == 0 and grad[s_pos].abs().sum() > 0
