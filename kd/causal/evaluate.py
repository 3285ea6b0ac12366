"""Scoring a causal student against its teacher on held-out blocks, and its continuations.

Per batch of held-out blocks (``kd.causal.metrics.batch_scores``): the student's and the
teacher's negative log-likelihood, KL(teacher ‖ student) at T = 1 over the whole vocabulary, and
top-1 agreement, summed over the predicting positions; the split's figures are their per-position
means (perplexity = exp(mean NLL)). The per-batch rows are what the original study's Figures 3–4 plot for
the MLM family: the logit loss of every held-out batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd.causal.metrics import batch_scores, summarize


@torch.no_grad()
def score(student: nn.Module, teacher: nn.Module, blocks: Tensor, batch_size: int,
          device: torch.device) -> tuple[list[dict[str, float]], dict[str, float]]:  # fmt: skip
    """(one row per batch: its mean KL, NLL and agreement; the split's summary)."""
    student.to(device).eval()
    teacher.to(device).eval()
    batches, rows = [], []
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        ids = blocks[start : start + batch_size].to(device)
        mask = torch.ones_like(ids)
        b = batch_scores(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, mask)
        batches.append(b)
        rows.append({"batch": i, "kl_t1": b["kl_t1"] / b["count"], "nll": b["nll"] / b["count"],
                     "top1_agreement": b["agree"] / b["count"]})  # fmt: skip
    return rows, summarize(batches)


def prompt_problem(tokenizer, prompts: list[str], max_new_tokens: int, positions: int
                   ) -> str | None:  # fmt: skip
    """Why the prompts and their continuations of ``max_new_tokens`` cannot fit a model's
    ``positions``, or None: past its positions a model's continuation is noise, silently."""
    for i, prompt in enumerate(prompts):
        n = len(tokenizer(prompt).input_ids)
        if n + max_new_tokens > positions:
            return (
                f"prompt {i} ({prompt[:40]!r}…) is {n} tokens, and with causal.evaluate."
                f"max_new_tokens={max_new_tokens} its continuation needs {n + max_new_tokens} "
                f"positions, but the models have {positions} (max_position_embeddings): shorten "
                f"the prompt to at most {max(positions - max_new_tokens, 0)} tokens, or lower "
                "max_new_tokens"
            )
    return None


@torch.no_grad()
def continuations(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                  device: torch.device) -> list[str]:  # fmt: skip
    """Each prompt's greedy continuation (the new text only)."""
    model.to(device).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        new = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1]:]  # fmt: skip
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out
