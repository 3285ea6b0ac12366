"""Capture intermediate activations with forward hooks.

Hooks on the query/key projections rather than `output_attentions=True`: under the fused SDPA
kernel transformers 5 returns no attention maps at all, and switching the whole model to eager
attention would slow every layer. Recomputing Q·Kᵀ from the hooked projections keeps SDPA and
makes only the mapped layers pay for the [B, H, L, L] scores.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def _lookup(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5) or names[:5]
        raise ValueError(
            f"no submodule at path {path!r} in {type(model).__name__}; "
            f"similar valid paths: {', '.join(close)}"
        ) from None


@contextmanager
def capture(model: nn.Module, paths: dict[str, str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the submodules at `paths` (name -> dotted path) while in the block.

    Yields a dict that fills up, under each name, as the model runs forward. A tuple output is
    reduced to its first element (the hidden states, by HF convention). The hooks are removed on
    exit, also when the block raises, so a model is never left carrying stale hooks.
    """
    # Resolve every path first so a typo raises before any hook is attached.
    modules = {name: _lookup(model, path) for name, path in paths.items()}
    captured: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def attention_scores(
    query: Tensor, key: Tensor, num_heads: int, attention_mask: Tensor | None
) -> Tensor:
    """Pre-softmax attention scores Q·Kᵀ/√d, [B, H, L, L], from [B, L, H·d] projections.

    Key positions where `attention_mask` [B, L] is 0 are set to the dtype's minimum, the value
    BERT's extended additive mask uses, so softmax gives them zero weight without producing
    -inf (which would turn differences of masked scores into nan).
    """
    if query.shape != key.shape:
        raise ValueError(
            f"query and key differ in shape: {tuple(query.shape)} vs {tuple(key.shape)}"
        )
    width = query.shape[-1]
    if num_heads <= 0 or width % num_heads != 0:
        raise ValueError(
            f"projection width {width} is not divisible by num_heads={num_heads}; "
            f"check the model's num_attention_heads"
        )
    # Scale Q ([B, L, D]) rather than the scores ([B, H, L, L], L/d times larger): one small pass
    # instead of a large one, for every mapped layer of both models.
    q = _split_heads(query * (1.0 / math.sqrt(width // num_heads)), num_heads)
    k = _split_heads(key, num_heads)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if attention_mask is not None:
        masked = attention_mask.to(device=scores.device)[:, None, None, :] == 0
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    return scores


def attention_probs(scores: Tensor) -> Tensor:
    """Softmax over keys, in float32 so bf16 scores do not lose the small probabilities.

    The cast happens inside the softmax kernel (``dtype=``), not as a separate copy.
    """
    return torch.softmax(scores, dim=-1, dtype=torch.float32)
