"""The optimiser every training loop here uses: BERT's AdamW groups, fused where torch can.

One definition for the teacher's adaptation (kd/models/teacher.py) and every distillation arm
(kd/training/loop.py), so a change of recipe reaches both.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and LayerNorm weights (the 1-D parameters), as BERT's
    optimiser. ``named_parameters`` lists a tied weight once, so the decoder is not doubled."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, with the fused kernel on CPU and CUDA (one pass over all
    parameters instead of a chain of foreach ops: the same update up to float rounding, and a
    few percent off a training step on a 2-core CPU, where the update is not negligible next to
    a small model's forward and backward)."""
    groups = param_groups(model, weight_decay)
    device = next(p for g in groups for p in g["params"]).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, fused=fused)
