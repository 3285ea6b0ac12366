"""Per-layer gradient norms, for spotting which part of the student a loss term is pushing on.

Call `grad_norms` after backward and before clipping: clipping rescales every gradient, which
would hide the very imbalance these numbers are meant to show.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn import Parameter

from kd.models import parts


def layer_groups(
    model: nn.Module, extra: dict[str, nn.Module] | None = None
) -> dict[str, list[Parameter]]:
    """Split the trainable parameters of a transformer (an MLM encoder or a causal LM) into
    named groups.

    Groups: "embeddings", "layer_0" … "layer_{n-1}", "head" (BERT's ``cls`` prediction head, a
    decoder's ``lm_head``; left out when it holds nothing of its own), one group per `extra`
    module under its key (e.g. hidden-state projections), and "other" for any remaining model
    parameter (a pooler, a decoder's final norm), present only if non-empty. Each parameter
    appears once, in the first group that reaches it: a head tied to the word embeddings is
    counted under "embeddings" and left out of "head". The parts come from kd/models/parts.py.
    """
    modules: dict[str, nn.Module] = {"embeddings": parts.embeddings(model)}
    for i, layer in enumerate(parts.blocks(model)):
        modules[f"layer_{i}"] = layer
    modules["head"] = parts.head(model)
    for name, module in (extra or {}).items():
        if name in modules or name == "other":
            raise ValueError(f"extra group name {name!r} clashes with a built-in group")
        modules[name] = module

    seen: set[int] = set()
    groups: dict[str, list[Parameter]] = {}

    def take(params: Iterable[Parameter]) -> list[Parameter]:
        out = []
        for p in params:
            # Identity, not name: tied weights are one tensor under several names.
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    for name, module in modules.items():
        groups[name] = take(module.parameters())
    if not groups["head"]:
        del groups["head"]
    other = take(model.parameters())
    if other:
        groups["other"] = other
    return groups


def grad_norms(
    groups: dict[str, list[Parameter]], extra: Collection[str] = ()
) -> dict[str, float]:
    """L2 norm of the gradients of each group, plus "global" over the student and "total".

        ||g_G||₂ = sqrt(Σ_{p∈G} ||∇p||₂²),   global = sqrt(Σ_p ||∇p||₂²) over distinct p

    "global" sums the groups not named in ``extra`` (the student's own parameters), so arms
    with and without projections compare the same parameter set; "total" sums every group,
    and matches `clip_grad_norm_`'s norm over the same parameters. Parameters without a
    gradient count as zero; a parameter listed in several groups counts once.
    """
    index: dict[int, int] = {}
    grads: list[Tensor] = []
    for params in groups.values():
        for p in params:
            if p.grad is not None and id(p) not in index:
                index[id(p)] = len(grads)
                grads.append(p.grad)
    if not grads:
        return {**dict.fromkeys(groups, 0.0), "global": 0.0, "total": 0.0}

    # Norms in float32 so bf16 gradients neither overflow nor lose the small terms of the sum.
    # Under FSDP each process holds a shard of every gradient (a DTensor): the squares of its
    # shards, summed over processes, are the squares of the whole gradients.
    is_sharded = [isinstance(g, DTensor) for g in grads]
    local = [g.to_local() if s else g for g, s in zip(grads, is_sharded, strict=True)]
    sq = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float32)).square()
    if any(is_sharded):
        if not all(is_sharded):
            raise ValueError("some gradients are sharded and others not: FSDP shards them all")
        if not all(p.is_shard() for g in grads for p in g.placements):
            raise ValueError("a replicated gradient would be counted once per process")
        torch.distributed.all_reduce(sq)
    zero = sq.new_zeros(())
    rows = []

    def norm_of(names) -> Tensor:
        ids = sorted({index[id(p)] for g in names for p in groups[g] if id(p) in index})
        return sq[ids].sum() if ids else zero

    for name in groups:
        rows.append(norm_of([name]))
    rows.append(norm_of([g for g in groups if g not in extra]))
    rows.append(sq.sum())
    # One .tolist() on one tensor: each .item() on a GPU tensor is a blocking device sync, and
    # this runs at every logged step.
    values = torch.stack(rows).sqrt().tolist()
    return {**dict(zip(groups, values[:-2], strict=True)), "global": values[-2],
            "total": values[-1]}
