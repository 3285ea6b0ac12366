"""Which loss term drives which layer: each term's own gradient, on the step's own forward.

The original study explains the multi-loss arm's larger gradient norm by its hidden-state loss
without measuring it. Here, every ``train.attribution_every`` steps, the gradient of each weighted
term alone, g_k = ∇_θ (w_k · L_k), is taken with ``torch.autograd.grad`` on the graph that the
combined loss then backpropagates through (``retain_graph``): no extra forward runs and no random
number is drawn, so training follows exactly the same trajectory with attribution on or off. By
linearity Σ_k g_k = ∇_θ Σ_k w_k L_k, the gradient that trains (a test checks it).

Reported per term k: ‖g_k‖₂ per layer group (the groups of kd/training/gradnorm.py), over the
student's parameters (``global``, as gradnorm's) and over every trained parameter (``total``); and for each pair of terms the cosine of their gradients over the parameters both
reach, cos(g_a, g_b) = ⟨g_a, g_b⟩ / (‖g_a‖ ‖g_b‖) — negative when the terms pull the shared
weights in opposing directions. Under DDP each rank attributes its own share of the batch and
rank 0 reports its share (the gradients are not all-reduced for this diagnostic).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

import torch
from torch import Tensor
from torch.nn import Parameter

PREFIX = "attr"


def term_gradients(
    terms: dict[str, Tensor], weights: dict[str, float], params: list[Parameter]
) -> dict[str, list[Tensor | None]]:
    """g_k = ∇ (w_k · L_k) for each term, keeping the graph for the combined backward.

    None marks a parameter a term does not reach (e.g. the prediction head for the hidden term).
    """
    out = {}
    for name, value in terms.items():
        out[name] = list(
            torch.autograd.grad(
                weights[name] * value, params, retain_graph=True, allow_unused=True
            )
        )
    return out


def accumulate(
    into: dict[str, list[Tensor | None]] | None,
    grads: dict[str, list[Tensor | None]],
    scale: float,
) -> dict[str, list[Tensor | None]]:
    """Sum micro-batches' term gradients, each scaled as its backward is (1 / micro-batches)."""
    if into is None:
        return {k: [None if g is None else g * scale for g in gs] for k, gs in grads.items()}
    for k, gs in grads.items():
        for i, g in enumerate(gs):
            if g is not None:
                into[k][i] = g * scale if into[k][i] is None else into[k][i] + g * scale
    return into


def summarize(
    grads: dict[str, list[Tensor | None]],
    params: list[Parameter],
    groups: dict[str, list[Parameter]],
    extra: Collection[str] = (),
) -> dict[str, float]:
    """``attr/<term>/<group>`` norms (plus ``/global`` over the groups not in ``extra``, the
    student's, and ``/total``) and ``attr/cos/<a>~<b>`` cosines."""
    index = {id(p): i for i, p in enumerate(params)}
    out: dict[str, float] = {}
    for term, gs in grads.items():
        # float32 squares, as kd/training/gradnorm.py: bf16 would lose the small contributions.
        sq = [None if g is None else g.float().square().sum() for g in gs]
        total = torch.zeros((), device=params[0].device)
        for group, members in groups.items():
            s = sum((sq[index[id(p)]] for p in members if sq[index[id(p)]] is not None), total)
            out[f"{PREFIX}/{term}/{group}"] = s
        out[f"{PREFIX}/{term}/global"] = sum(
            (out[f"{PREFIX}/{term}/{g}"] for g in groups if g not in extra), total)
        out[f"{PREFIX}/{term}/total"] = sum((s for s in sq if s is not None), total)
    for a, b in itertools.combinations(grads, 2):
        shared = [
            (ga, gb)
            for ga, gb in zip(grads[a], grads[b], strict=True)
            if ga is not None and gb is not None
        ]
        if not shared:
            continue  # the terms touch disjoint parameters: no angle between them
        dot = sum((ga.float() * gb.float()).sum() for ga, gb in shared)
        na = sum(ga.float().square().sum() for ga, _ in shared).sqrt()
        nb = sum(gb.float().square().sum() for _, gb in shared).sqrt()
        out[f"{PREFIX}/cos/{a}~{b}"] = dot / (na * nb).clamp_min(1e-30)
    keys = list(out)
    # One host transfer for all values: .item() per value would sync a GPU each time.
    values = torch.stack([torch.as_tensor(out[k], dtype=torch.float32) for k in keys]).tolist()
    return {
        k: (v if "/cos/" in k else v**0.5) for k, v in zip(keys, values, strict=True)
    }
