"""On-policy data (GKD's λ): part of each batch is text the student writes itself.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), train the student on a mixture: with probability λ a sequence is the student's
own continuation of a prompt, scored by the teacher, so the student learns from the states its
own mistakes lead to rather than only from the corpus (the train–inference mismatch of
sequence-level KD). Here a fixed fraction λ of each batch's rows (chosen by a seeded generator)
keeps its first ``prompt_len`` tokens and has the rest replaced by the student's sampled
continuation, generated with the KV cache; the teacher then runs online on the new rows (a cache
made from the corpus cannot know them).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rows_to_replace(batch_size: int, fraction: float, generator: torch.Generator) -> Tensor:
    """round(λ · B) distinct row indices, drawn with ``generator``, in increasing order."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the on-policy fraction λ must be in [0, 1], got {fraction}")
    n = round(fraction * batch_size)
    return torch.randperm(batch_size, generator=generator)[:n].sort().values


@torch.no_grad()
def mix_in_student_text(
    student,
    input_ids: Tensor,
    fraction: float,
    prompt_len: int,
    seed: int,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(input_ids with λ of the rows continued by the student, the replaced row indices).

    Every row is a full block (packed text, no padding). ``temperature`` 0 decodes greedily;
    otherwise tokens are sampled at that temperature with a generator seeded by ``seed`` (the
    same seed, the same text). The student's train/eval mode is left as it was.
    """
    batch, length = input_ids.shape
    if not 1 <= prompt_len < length:
        raise ValueError(
            f"prompt_len must be in [1, {length - 1}] for blocks of {length}, got {prompt_len}"
        )
    rows = rows_to_replace(batch, fraction, torch.Generator().manual_seed(seed))
    if len(rows) == 0:
        return input_ids, rows
    prompts = input_ids[rows.to(input_ids.device), :prompt_len]
    sample = temperature > 0
    was_training = student.training
    student.eval()
    # generate() draws from the global RNG: fork it so the seed decides the text and the
    # training's own random stream is left untouched.
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = student.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=length - prompt_len,
                min_new_tokens=length - prompt_len,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_k=0 if sample else None,
                top_p=1.0 if sample else None,
                use_cache=True,
                pad_token_id=student.config.eos_token_id or 0,
            )
    finally:
        student.train(was_training)
    mixed = input_ids.clone()
    mixed[rows.to(input_ids.device)] = out[:, :length]
    return mixed, rows
