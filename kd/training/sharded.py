"""Sharded training (``base.parallel: fsdp``): PyTorch's FSDP2 and its distributed checkpoints.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each process holds 1/world of every
parameter, gradient and AdamW moment instead of a whole copy (DDP): a block's weights are
all-gathered just before its forward and backward and freed after, gradients are
reduce-scattered. The student's blocks are one unit each, the rest of the distiller (embeddings,
head, projections) is the root unit; the optimisation is DDP's, up to float rounding (the
reductions sum in another order).

The frozen teacher can be sharded too (``base.shard_teacher``): its blocks, which hold nearly
all of a large model's weights, one unit each; its embeddings and head stay whole on every
process, because the distillers call them outside the model's own forward (the MLM head on
gathered positions, a decoder's output embedding on the cache's rows).

Checkpoints go through ``torch.distributed.checkpoint`` (DCP): every process writes its shards
of the weights and optimiser moments, and a load re-shards them for the processes that load, so
a run saved under N processes resumes under M (any M, 1 included). What is the same on every
process (step, rows, scheduler, RNG state, MLflow run id) goes in the small ``checkpoint.pt``
kd/training/checkpoint.py already writes, which names the DCP folder it belongs to; it is
replaced only after that folder is complete, so a kill during a save resumes from the previous
one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from kd.core import dist as kdist
from kd.core.dist import Dist
from kd.models import parts
from kd.training import checkpoint

PREFIX = "sharded-"  # DCP folders in the checkpoint directory: sharded-<step>
KEY = "sharded"  # checkpoint.pt's key naming its DCP folder


def shard_student(distiller: nn.Module) -> nn.Module:
    """Shard ``distiller`` in place: each student block a unit, the rest the root unit."""
    for block in parts.blocks(distiller.student):
        fully_shard(block)
    fully_shard(distiller)
    return distiller


def shard_teacher(teacher: nn.Module) -> nn.Module:
    """Shard the frozen teacher's blocks in place, one unit each (see the module docstring for
    why the embeddings and head stay whole)."""
    for block in parts.blocks(teacher):
        fully_shard(block)
    return teacher


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's ``no_sync``: without sync, micro-batch gradients accumulate unreduced."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def local(t):
    """This process's part of ``t``: its shard of a DTensor, or ``t`` itself."""
    if not is_sharded(t):
        return t
    if not all(p.is_shard() for p in t.placements):
        # A replicated DTensor's local part is the whole tensor: summing squares over ranks
        # (kd/training/gradnorm.py) would count it world times.
        raise ValueError(f"expected a sharded gradient, got placements {t.placements}")
    return t.to_local()


def scalar(t) -> float:
    """A 0-dim tensor's value; a DTensor's (e.g. clip_grad_norm_'s norm) in full."""
    return float(t.full_tensor() if is_sharded(t) else t)


def folder(ckpt_dir, step: int) -> Path:
    return Path(ckpt_dir) / f"{PREFIX}{step}"


def save(ckpt_dir, state: dict, model: nn.Module, opt: torch.optim.Optimizer, dist: Dist) -> None:
    """Write the weights and AdamW state as DCP shards (every process its own), then, on rank
    0, ``state`` (what every process holds alike) naming them; older DCP folders are removed
    after. Collective: every process calls it."""
    step = state["step"]
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder(ckpt_dir, step))
    kdist.barrier(dist)  # every shard written before checkpoint.pt points at them
    if dist.main:
        checkpoint.save(ckpt_dir, {**state, KEY: folder(ckpt_dir, step).name})
        for old in Path(ckpt_dir).glob(f"{PREFIX}*"):
            if old.name != folder(ckpt_dir, step).name:
                shutil.rmtree(old, ignore_errors=True)
    kdist.barrier(dist)


def load(ckpt_dir, state: dict, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load the DCP shards ``state`` names into ``model`` and ``opt``, re-sharded for however
    many processes load them now."""
    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=Path(ckpt_dir) / state[KEY])
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])


def remove(ckpt_dir) -> None:
    for old in Path(ckpt_dir).glob(f"{PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict, in CPU memory on rank 0 ({} on the others), for saving
    the trained student. Collective."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
