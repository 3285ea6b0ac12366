"""Dropout with cheaper random masks, for students trained on the CPU.

torch's CPU dropout draws one random number per element with ``bernoulli_``, serially, and
then scales in a second pass: in a distillation step of the default multi arm (TinyBERT's
dropout 0.1 on the embeddings, every sublayer output and the 12 × 128 × 128 attention maps of
each layer) that was 13 % of the whole step (README, Performance). Here a mask element costs
half of one 32-bit draw (two 16-bit lanes per ``random_()`` integer, compared in one pass),
and the mask is applied and scaled in one pass by ``native_dropout_backward`` (x·mask·scale,
which autograd differentiates), about 2.2× faster than torch's dropout on a 25 M-element map.

The distribution is dropout's: each element is kept independently with probability 1 − p'
and scaled by 1/(1 − p'), where p' = round(p·2¹⁵)/2¹⁵ is p to within 1.5e-5 (0.1 becomes
0.1000061), so E[output] = input exactly. Only the random stream differs from torch's: masks
still come from torch's seeded generator, so a seeded run is reproducible and a resumed one
continues the same way a torch-dropout run would.

On CUDA torch's fused Philox dropout is already cheap, so :func:`use_fast_dropout` changes
nothing there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LANES = 2  # 16-bit lanes per 32-bit draw
QUANTUM = 1 << 15  # the drop rate is a multiple of 2^-15
IMPLEMENTATION = "kd_eager"  # transformers attention name: eager math, these masks


def drop_rate(p: float) -> float:
    """The rate :func:`keep_mask` actually drops with: p rounded to a multiple of 2⁻¹⁵."""
    return round(p * QUANTUM) / QUANTUM


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A bool mask of ``shape``, each element False (dropped) with probability ``drop_rate(p)``.

    ``random_()`` on int32 fills [0, 2³¹): viewed as two int16 lanes, the low lane is uniform
    over all 2¹⁶ values and the high one over [0, 2¹⁵). Comparing each lane with its own
    threshold (m = p·2¹⁵ rounded: the low lane drops below −2¹⁵ + 2m, the high lane below m)
    gives both the same rate m/2¹⁵.
    """
    n = math.prod(shape)
    m = round(p * QUANTUM)
    words = torch.empty((n + 1) // LANES, dtype=torch.int32, device=device).random_()
    # Lane order assumes a little-endian host (x86, ARM): lane 0 is the low half of a word.
    threshold = torch.tensor([-QUANTUM + 2 * m, m], dtype=torch.int16, device=device)
    keep = words.view(torch.int16).view(-1, LANES) >= threshold
    return keep.view(-1)[:n].view(shape)


def drop(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout of ``x`` with :func:`keep_mask`'s masks; identity when not training."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    rate = drop_rate(p)
    if rate == 0.0:
        return x
    keep = keep_mask(x.shape, p, x.device)
    # native_dropout_backward(x, mask, scale) = x·mask·scale in one pass; its derivative with
    # respect to x is the same product on the incoming gradient.
    return torch.ops.aten.native_dropout_backward(x, keep, 1.0 / (1.0 - rate))


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`drop`'s masks (an ``nn.Dropout``, so ``p`` reads the same)."""

    def forward(self, x: Tensor) -> Tensor:
        return drop(x, self.p, self.training)


def eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' eager attention for BERT, softmax(QKᵀ·s + mask)·V, with :func:`drop` on
    the probabilities (registered as ``kd_eager``; the same signature and outputs)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    weights = drop(weights, dropout, module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, eager_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # eager's additive float mask


def use_fast_dropout(model: nn.Module, device: torch.device) -> bool:
    """On the CPU, give ``model`` (a transformers BERT-family model) these masks; returns
    whether it did.

    Every ``nn.Dropout`` module becomes a :class:`Dropout` with the same ``p``; a model on
    transformers' eager attention switches to ``kd_eager`` (the same math). A model on SDPA keeps
    its kernel, whose attention dropout is internal. Weights and the saved config are untouched.
    """
    if device.type != "cpu":
        return False
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
    if model.config._attn_implementation == "eager":
        _register()
        model.set_attn_implementation(IMPLEMENTATION)
    return True
