"""What every training stage does around the one loop, for either family.

A stage (stages/train.py, stages/causal_train.py) loads its models and data, builds its
family's distiller and batches, then hands over to :func:`run`: check the initial student is the
one its stage recorded, resume a checkpoint written under the same inputs (and only such a
one), open the arm's MLflow run, train (kd/training/loop.py), let the stage save what it
declares, log the summary, and drop the checkpoint. Under torchrun rank 0 alone tracks and
writes; the others only train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kd.core import dist as kdist
from kd.core import tracking
from kd.core.dist import Dist
from kd.core.io import atomic_dir, write_json
from kd.models.student import weights_hash
from kd.training import checkpoint
from kd.training.loop import Result, train


def initial_weights(model: nn.Module, expected: str, folder: Path, stage: str) -> str:
    """The hash of ``model``'s weights, which must be the ones ``stage`` recorded for
    ``folder``: both arms start from exactly the same student, or the comparison is void."""
    got = weights_hash(model)
    if got != expected:
        raise SystemExit(
            f"{folder} does not hold the weights {stage} recorded ({got[:12]} != "
            f"{expected[:12]}): rebuild it with `dvc repro -f {stage}`"
        )
    return got


def save_student(out: Path, distiller: nn.Module, tokenizer, config: Mapping,
                 state: Mapping | None = None) -> None:  # fmt: skip
    """The trained student as a ``save_pretrained`` folder with its tokenizer, the projections
    (for evaluation's hidden-state terms; not part of the model) and ``kd_config.json`` (how it
    was made), written atomically. ``state`` is the distiller's whole state dict when its
    modules hold shards only (FSDP: ``Result.state``)."""

    def part(prefix: str) -> dict | None:
        if state is None:
            return None
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    with atomic_dir(out) as tmp:
        distiller.student.save_pretrained(tmp, state_dict=part("student."))
        tokenizer.save_pretrained(tmp)
        if distiller.projections is not None:
            projections = part("projections.")
            torch.save(distiller.projections.state_dict() if projections is None else projections,
                       tmp / "projections.pt")  # fmt: skip
        write_json(tmp / "kd_config.json", dict(config))


@dataclass(frozen=True)
class Arm:
    """One arm's training job: what :func:`run` needs besides the models and the batches."""

    stage: str  # MLflow stage name: "train" or "causal_train"
    name: str  # the arm
    seed: int
    precision: str
    attention: str  # base.attention, for the student
    ckpt_dir: Path
    fingerprint: str  # checkpoint.fingerprint of every input the next step depends on
    run_params: Mapping  # logged once, on a fresh (not resumed) run
    tags: Mapping
    runtime: Mapping
    parallel: str = "ddp"  # base.parallel
    shard_teacher: bool = False  # base.shard_teacher


@contextmanager
def run(arm: Arm, distiller: nn.Module, teacher: nn.Module | None, batches, cfg, *,
        device: torch.device, dist: Dist, flops_of: Callable | None = None,
        dataset: tuple | None = None) -> Iterator[tuple[Result, tracking.Run] | None]:  # fmt: skip
    """Train ``arm`` and yield (result, MLflow run) on rank 0 for the stage to save its
    outputs in; other ranks get None. ``dataset`` is (Dataset, name, path) to log as the run's
    training input."""
    resume = checkpoint.load(arm.ckpt_dir, arm.fingerprint)
    with tracking.start_run(
        arm.stage, params=None if resume else dict(arm.run_params), arm=arm.name,
        tags=dict(arm.tags), run_id=resume.get("mlflow_run_id") if resume else None,
        enabled=dist.main, runtime=dict(arm.runtime), system_metrics=True,
    ) as mlrun:  # fmt: skip
        if dataset is not None:
            mlrun.log_dataset(*dataset, "training")
        result = train(distiller, teacher, batches, cfg, seed=arm.seed, precision=arm.precision,
                       attention=arm.attention, device=device, run=mlrun,
                       ckpt_dir=arm.ckpt_dir, fingerprint=arm.fingerprint, resume=resume,
                       dist=dist, flops_of=flops_of, parallel=arm.parallel,
                       shard_teacher=arm.shard_teacher)  # fmt: skip
        if not dist.main:
            kdist.shutdown(dist)
            yield None
            return
        yield result, mlrun
        steps = result.summary["steps"]
        # Prefixed: "tokens" is also a per-step curve, which a step-less point would join.
        mlrun.log_metrics({f"summary/{k}": v for k, v in result.summary.items()
                           if isinstance(v, float | int)}, step=steps)  # fmt: skip
        # time/total/...: the per-step curve time/seconds must not get a second point at the
        # last step (a queued experiment's history would hold one more point than its CSV).
        mlrun.log_metrics({f"time/total/{k}": v for k, v in result.timing.items()}, step=steps)
    checkpoint.remove(arm.ckpt_dir)
    kdist.shutdown(dist)
    print(f"{arm.name}: {result.summary['steps']} steps, {result.timing['tokens_per_s']:.0f} "
          f"tokens/s, final loss {result.summary['final/loss/total']:.4f}")
