"""Process-group setup for ``torchrun``: one code path for 1 process or many.

Under torchrun (WORLD_SIZE > 1) every rank joins a process group: gloo on CPU, NCCL on GPU, each
rank on its own GPU. Rank 0 alone talks to MLflow and writes outputs; the others compute.
Without torchrun this is a single process of world size 1 and nothing here costs anything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()  # one process, no process group


def rank() -> int:
    """This process's rank under torchrun (0 without it), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def torchrun(nproc: int) -> str:
    """The torchrun executable that starts ``nproc`` processes; one paragraph if there is none."""
    path = shutil.which("torchrun")
    if path is None:
        raise SystemExit(
            f"base.nproc={nproc} starts its processes with torchrun, which is not on PATH: "
            "activate the environment torch is installed in, or set base.nproc: 1"
        )
    return path


def identity(base) -> dict:
    """``base`` (kd.core.params.Base) for a checkpoint's fingerprint, without the process
    count: the global batch fixes the optimisation, so a run saved under N processes resumes
    under M (base.parallel stays: DDP and FSDP checkpoints differ in form)."""
    return base.model_dump(exclude={"nproc"})


def nodes(env: Mapping[str, str] = os.environ) -> int:
    """The node count a multi-node job asks for (torchrun's PET_NNODES; the minimum of an
    elastic MIN:MAX), else 1. kd/training/launch.py says why it is not a param."""
    value = env.get("PET_NNODES", "1")
    try:
        return int(value.split(":")[0])
    except ValueError:
        raise SystemExit(
            f"PET_NNODES={value!r} is not a node count: set it to the number of nodes (e.g. 2) "
            "or MIN:MAX for an elastic job"
        ) from None


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any); returns it and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def mean(values: dict[str, float], dist: Dist, device: torch.device) -> dict[str, float]:
    """The mean of each value over ranks (for logging: every rank logs what rank 0 logs)."""
    if not dist.active:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return dict(zip(keys, (t / dist.world).tolist(), strict=True))


def any_rank(flag: bool, dist: Dist, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank; every rank gets the same answer (so all stop
    together: one rank leaving the loop alone would leave the others waiting in all-reduce)."""
    if not dist.active:
        return flag
    t = torch.tensor([int(flag)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def same_everywhere(value: int, dist: Dist, device: torch.device, what: str) -> None:
    """Refuse to go on unless ``value`` is the same on every rank (``what`` says what differs)."""
    if not dist.active:
        return
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)  # max and -min in one call
    if t[0].item() != -t[1].item():
        raise SystemExit(
            f"the processes disagree about {what}: one has {int(-t[1].item())}, another "
            f"{int(t[0].item())}"
        )


def barrier(dist: Dist) -> None:
    if dist.active:
        tdist.barrier()


def shutdown(dist: Dist) -> None:
    if dist.active and tdist.is_initialized():
        tdist.destroy_process_group()
