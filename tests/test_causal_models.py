"""Causal-LM students from a subset of the teacher's layers, and the causal held-out scores,
on tiny random Llama-shaped models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_llama
from torch import nn

from kd.causal import metrics, onpolicy
from kd.causal.students import blocks_path, from_config, from_teacher_layers, uniform_layers


def test_uniform_layers_keep_the_ends_and_spread_the_rest() -> None:
    assert uniform_layers(30, 30) == list(range(30))
    assert uniform_layers(30, 2) == [0, 29]
    assert uniform_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert uniform_layers(30, 1) == [29]
    with pytest.raises(ValueError, match="1..30"):
        uniform_layers(30, 31)


def test_all_layers_is_the_teacher() -> None:
    teacher = tiny_llama()
    student = from_teacher_layers(teacher, [0, 1, 2, 3])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_a_subset_runs_exactly_those_teacher_layers(tie) -> None:
    teacher = tiny_llama(tie=tie)
    student = from_teacher_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert student.config.tie_word_embeddings == tie
    # The teacher with its blocks 1 and 2 taken out computes what the student computes.
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = student(ids, use_cache=False).logits
        blocks = teacher.model.layers
        teacher.model.layers = nn.ModuleList([blocks[0], blocks[3]])
        teacher.config.num_hidden_layers = 2
        assert torch.equal(teacher(ids, use_cache=False).logits, expected)
    # A copy: training the student leaves the teacher as it was.
    with torch.no_grad():
        student.model.layers[1].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, blocks[3].mlp.up_proj.weight)


def test_bad_layer_lists_are_refused() -> None:
    teacher = tiny_llama()
    assert blocks_path(teacher) == "model.layers"
    for bad in ([], [1, 0], [0, 0], [0, 4], [-1, 2]):
        with pytest.raises(ValueError, match="layers must be increasing"):
            from_teacher_layers(teacher, bad)


def test_scores_on_hand_checkable_logits() -> None:
    # Vocabulary of 2; one sequence of 3 tokens [0, 1, 1] with its last token padded away:
    # a single predicting position (t = 0 → token 1).
    ids = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[1, 1, 0]])
    log = math.log
    student = torch.tensor([[[log(0.25), log(0.75)], [0.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[log(0.5), log(0.5)], [5.0, 0.0], [0.0, 0.0]]])
    s = metrics.batch_scores(student, teacher, ids, mask)
    assert s["count"] == 1
    assert s["nll"] == pytest.approx(-log(0.75))
    assert s["teacher_nll"] == pytest.approx(-log(0.5))
    assert s["kl_t1"] == pytest.approx(0.5 * log(0.5 / 0.25) + 0.5 * log(0.5 / 0.75))
    assert s["agree"] == 0.0  # argmax 1 vs the teacher's tie, broken to 0
    out = metrics.summarize([s])
    assert out["perplexity"] == pytest.approx(1 / 0.75)
    assert out["teacher_perplexity"] == pytest.approx(2.0)


def test_scores_combine_over_batches_as_one_pass() -> None:
    teacher, student = tiny_llama(seed=0), from_teacher_layers(tiny_llama(seed=0), [0, 2])
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    with torch.no_grad():
        s_logits, t_logits = student(ids).logits, teacher(ids).logits
    whole = metrics.summarize([metrics.batch_scores(s_logits, t_logits, ids, mask)])
    halves = metrics.summarize(
        [
            metrics.batch_scores(s_logits[sl], t_logits[sl], ids[sl], mask[sl])
            for sl in (slice(0, 1), slice(1, 4))
        ]
    )
    assert whole["positions"] == 4 * 9 - 3 - 3 == halves["positions"]
    for key, value in whole.items():
        assert halves[key] == pytest.approx(value, rel=1e-6), key
    # Perplexity agrees with the model's own loss on an unpadded batch.
    with torch.no_grad():
        own = teacher(ids[:1], labels=ids[:1]).loss
    one = metrics.summarize([metrics.batch_scores(t_logits[:1], t_logits[:1], ids[:1], mask[:1])])
    assert one["perplexity"] == pytest.approx(math.exp(float(own)), rel=1e-5)
    assert one["kl_t1"] == pytest.approx(0.0, abs=1e-6) and one["top1_agreement"] == 1.0


# --- on-policy data (GKD's λ) -------------------------------------------------------------------


def _blocks(batch=4, length=10, seed=5):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_no_fraction_changes_nothing() -> None:
    ids = _blocks()
    mixed, rows = onpolicy.mix_in_student_text(tiny_llama(), ids, 0.0, prompt_len=4, seed=0)
    assert mixed is ids and len(rows) == 0


def test_greedy_continuations_with_the_kv_cache_equal_a_step_by_step_rollout() -> None:
    student, ids = tiny_llama(layers=2, seed=1), _blocks()
    mixed, rows = onpolicy.mix_in_student_text(
        student, ids, 0.5, prompt_len=4, seed=0, temperature=0
    )
    assert len(rows) == 2
    untouched = [r for r in range(4) if r not in rows.tolist()]
    assert torch.equal(mixed[untouched], ids[untouched])
    assert torch.equal(mixed[rows, :4], ids[rows, :4])  # the prompts stay
    # The same text by the slow road: the whole prefix through the model at every step.
    seq = ids[rows, :4]
    with torch.no_grad():
        while seq.shape[1] < 10:
            nxt = student(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(mixed[rows], seq)


def test_sampled_continuations_follow_the_seed_and_leave_the_global_rng_alone() -> None:
    student, ids = tiny_llama(layers=2, seed=1), _blocks(batch=6)
    student.train()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, rows_a = onpolicy.mix_in_student_text(student, ids, 0.5, prompt_len=3, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)  # the training's random stream did not move
    assert student.training  # and the student is back in train mode
    b, rows_b = onpolicy.mix_in_student_text(student, ids, 0.5, prompt_len=3, seed=7)
    c, _ = onpolicy.mix_in_student_text(student, ids, 0.5, prompt_len=3, seed=8)
    assert torch.equal(a, b) and torch.equal(rows_a, rows_b)
    assert not torch.equal(a, c)
    assert len(rows_a) == 3 and not torch.equal(a[rows_a, 3:], ids[rows_a, 3:])


def test_bad_on_policy_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        onpolicy.mix_in_student_text(tiny_llama(), _blocks(), 1.5, prompt_len=4, seed=0)
    with pytest.raises(ValueError, match="prompt_len"):
        onpolicy.mix_in_student_text(tiny_llama(), _blocks(), 0.5, prompt_len=10, seed=0)


def test_a_narrower_random_student_keeps_the_vocabulary_and_is_seeded() -> None:
    teacher = tiny_llama(layers=4)
    shape = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=16)  # fmt: skip
    a, b = from_config(teacher, 0, **shape), from_config(teacher, 0, **shape)
    assert a.config.vocab_size == teacher.config.vocab_size and a.config.hidden_size == 8
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, from_config(teacher, 1, **shape).lm_head.weight)
    with pytest.raises(ValueError, match="no field"):
        from_config(teacher, 0, hidden_sise=8)
