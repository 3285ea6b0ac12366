"""What this machine must offer the params: the device, and the processes base.nproc starts."""

from __future__ import annotations

import os

import torch

from kd.core import dist as kdist
from kd.core import runtime
from kd.core.params import CausalTrain, Params, ParamsError, Train, batch_split_problem


def check(p: Params) -> None:
    base = p.base
    device = runtime.pick_device(base)  # the stages' own choice, and its message
    if base.nproc == 1:
        return
    # torchrun starts one process per GPU on a GPU machine, one per core otherwise (kd/core/dist).
    on_gpu = device.type == "cuda"
    have, what = (torch.cuda.device_count(), "CUDA devices") if on_gpu else (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        "CPU cores available to this process",
    )
    if base.nproc > have:
        raise SystemExit(
            f"base.nproc={base.nproc} processes, but this machine has {have} {what}: set "
            f"base.nproc to at most {have}"
        )
    kdist.torchrun(base.nproc)


def check_nodes(t: Train | CausalTrain, p: Params) -> None:
    """On several nodes (PET_NNODES, kd/training/launch.py), the global batch is split over
    every node's processes: base.nproc alone was checked with the params."""
    n = kdist.nodes()
    world = p.base.nproc * n
    if n > 1 and (problem := batch_split_problem(t, world)):
        raise ParamsError(f"PET_NNODES={n} nodes of base.nproc={p.base.nproc} processes make "
                          f"{world} in all, and with that many: {problem}")
