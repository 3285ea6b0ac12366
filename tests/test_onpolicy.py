"""kd.causal.onpolicy.mix_in_student_text: the rows it replaces hold the student's own
continuation of their prompt, sampled as the student samples (checked against a step-by-step
sampler written here), the prompts are kept, and every other row is the data's, unchanged."""

from __future__ import annotations

import torch
from tiny import tiny_llama

from kd.causal import onpolicy

B, L, PROMPT, VOCAB = 6, 12, 4, 64


def blocks(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def rollout(student, prompts: torch.Tensor, seed: int, temperature: float) -> torch.Tensor:
    """The student's continuation by the slow road: the whole prefix through the model at every
    step (no KV cache), then the next token drawn from softmax(logits / T) with torch's global
    generator seeded by ``seed`` — EOS left out, since every block is full (min_new_tokens) —
    or the argmax at T = 0."""
    torch.manual_seed(seed)
    seq = prompts
    while seq.shape[1] < L:
        logits = student(seq, use_cache=False).logits[:, -1].float()
        logits[:, student.config.eos_token_id] = -float("inf")
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1)
        seq = torch.cat([seq, nxt], 1)
    return seq


def sharp_student(seed: int):
    """A tiny random Llama whose next-token distributions are far from flat (a random head gives
    logits near 0, where T = 0.7 and T = 1 draw the same tokens from the same random numbers)."""
    student = tiny_llama(layers=2, seed=seed, tie=False)
    with torch.no_grad():
        student.lm_head.weight.mul_(8.0)
    return student


def test_sampled_rows_are_the_students_own_continuations_and_the_rest_the_datas() -> None:
    student, ids = sharp_student(seed=3), blocks()
    mixed, rows = onpolicy.mix_in_student_text(
        student, ids, 0.5, prompt_len=PROMPT, seed=11, temperature=0.7
    )
    # Which rows: round(λ·B) of them, the seeded draw's.
    expected = onpolicy.rows_to_replace(B, 0.5, torch.Generator().manual_seed(11))
    assert rows.tolist() == expected.tolist() and len(rows) == 3
    kept = [r for r in range(B) if r not in rows.tolist()]
    assert torch.equal(mixed[kept], ids[kept])  # the data's rows, unchanged
    assert torch.equal(mixed[rows, :PROMPT], ids[rows, :PROMPT])  # the prompts, kept
    assert not torch.equal(mixed[rows, PROMPT:], ids[rows, PROMPT:])  # the rest is new text
    # ... and that text is what the student itself samples from those prompts, row by row.
    want = rollout(student, ids[rows, :PROMPT], seed=11, temperature=0.7)
    assert torch.equal(mixed[rows], want)
    # (the temperature matters at this sharpness: T = 1 draws other text from the same seed)
    assert not torch.equal(want, rollout(student, ids[rows, :PROMPT], seed=11, temperature=1.0))
    assert ids.equal(blocks())  # the caller's batch is not written into


def test_greedy_rows_follow_their_own_prompts() -> None:
    # Rows whose prompts differ: a continuation put into the wrong row would show.
    student, ids = sharp_student(seed=4), blocks(seed=9)
    mixed, rows = onpolicy.mix_in_student_text(
        student, ids, 1.0, prompt_len=PROMPT, seed=0, temperature=0
    )
    assert rows.tolist() == list(range(B))
    assert torch.equal(mixed, rollout(student, ids[:, :PROMPT], seed=0, temperature=0))
