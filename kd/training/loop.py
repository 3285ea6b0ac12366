"""The distillation loop, shared by every arm of every family: the scheme decides the terms, a
family decides the batches and the forward, nothing else differs.

Each step: the blocks of a seeded order, the family's batch of them (fresh MLM masks; next-token
blocks with their teacher-cache rows or the student's own on-policy text), the distiller's
terms, backward, per-layer gradient norms (before clipping), clip, AdamW, schedule. The
randomness of step ``k`` (batch order, masks, on-policy text) is a pure function of (seed, k),
and the RNG states are checkpointed, so a resumed run replays exactly what an uninterrupted one
does. Under DDP or FSDP (``parallel``; kd/training/sharded.py) every rank builds the same global
batch and trains on its share of the rows.

A family brings three things (kd/distill/distiller.py and kd/data/masking.py for the MLM
family, kd/causal/distiller.py and kd/causal/batches.py for the causal one):

- a distiller: an ``nn.Module`` holding ``student``, whose ``forward(batch, teacher)`` returns
  the unweighted terms, with ``terms`` (name -> weight), ``total(terms)``,
  ``set_progress(step, n_steps)``, ``extra_groups()`` (trainable modules besides the student)
  and ``eager_attention`` (whether the attention maps need the eager kernel);
- its batches (:class:`Batches`);
- its layer groups, which kd/training/gradnorm.py finds through kd/models/parts.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from kd.core import dist as kdist
from kd.core import optim
from kd.core.dist import SINGLE, Dist
from kd.core.dist import mean as dist_mean
from kd.core.params import CausalTrain, Train
from kd.core.runtime import autocast, use_training_attention
from kd.training import attribution, checkpoint, interrupt, sharded
from kd.training.dropout import use_fast_dropout
from kd.training.gradnorm import grad_norms, layer_groups


class NonFiniteLoss(SystemExit):
    pass


def steps_per_epoch(n_blocks: int, batch_size: int, section: str = "train") -> int:
    if n_blocks < batch_size:
        raise SystemExit(
            f"the train split has {n_blocks} blocks, fewer than {section}.batch_size="
            f"{batch_size}: sample more documents (or blocks) or lower the batch size"
        )
    return n_blocks // batch_size  # drop the ragged tail: every step sees a full batch


def total_steps(cfg: Train | CausalTrain, n_blocks: int) -> int:
    per_epoch = steps_per_epoch(n_blocks, cfg.batch_size, cfg.section)  # refuses too few blocks
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


def split_batch(batch_size: int, world: int, micro_batch_size: int | None) -> tuple[int, int, int]:
    """(rows per rank, rows per micro-batch, micro-batches per step) for a global batch.

    The global batch is a param; the world size is not, so the same params give the same
    optimisation on 1 process or 8, with gradient accumulation making up the difference.
    """
    if batch_size % world:
        raise SystemExit(
            f"train.batch_size={batch_size} cannot be split evenly over {world} processes: "
            "make it a multiple of the process count"
        )
    share = batch_size // world
    micro = micro_batch_size or share
    if share % micro:
        raise SystemExit(
            f"each of the {world} processes gets {share} rows per step, which "
            f"train.micro_batch_size={micro} does not divide: pick a divisor of {share}"
        )
    return share, micro, share // micro


def step_generator(seed: int, step: int) -> torch.Generator:
    # Distinct, reproducible streams per step; large odd multiplier keeps (seed, step) pairs apart.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(n_blocks: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The blocks of global step ``step``: a fresh seeded permutation every epoch."""
    per_epoch = steps_per_epoch(n_blocks, batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


class Batches(Protocol):
    """A family's training batches: a global batch of blocks, and per-rank extras."""

    def __len__(self) -> int:
        """The blocks of the train split."""

    def __call__(self, indices: list[int], gen: torch.Generator) -> dict[str, Tensor]:
        """The global batch of blocks ``indices`` (rows in that order), drawing any randomness
        from ``gen``; every rank builds the same one."""

    def rows(self, indices: list[int]) -> dict[str, Tensor]:
        """What only the rows ``indices`` of this rank need (the teacher cache's rows), read
        by each rank for its own share; {} when there is nothing of the kind."""


def token_count(batch: dict[str, Tensor]) -> int:
    """The real tokens of a batch: its attention mask's, or every position of full blocks."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@dataclass
class Result:
    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    # Wall-clock figures: for MLflow and the console, never for an output DVC hashes.
    timing: dict[str, float] = field(default_factory=dict)
    # Under FSDP, the trained distiller's whole state dict on rank 0 (its modules hold shards
    # only): what kd/training/stage.py saves. None when the modules hold whole weights.
    state: dict[str, Tensor] | None = None


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every ``nn.Dropout`` of ``model`` to probability ``p``; returns how many there are.

    BERT's dropouts (embeddings, attention probabilities, each sublayer's output) are all
    ``nn.Dropout`` modules, and its attention functions read their ``p``, so this covers every
    one. Only the modules change: the model's saved config keeps its own rates, so a student
    fine-tuned later gets the dropout its architecture defines.
    """
    modules = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in modules:
        m.p = p
    return len(modules)


class Stepper:
    """One optimisation step of an arm: forward, backward, gradient norms, clip, AdamW, schedule.

    The training loop and the benchmark (kd/bench/bench.py) both drive this, so what is timed is what
    trains. ``step`` takes the *global* batch; under DDP each rank slices its share and
    accumulates micro-batches, so the optimisation does not depend on the process count.
    """

    def __init__(self, distiller: nn.Module, teacher: nn.Module | None, cfg: Train | CausalTrain,
                 n_steps: int, precision: str, device: torch.device, dist: Dist = SINGLE,
                 forward: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                 attention: str = "auto", parallel: str = "ddp",
                 shard_teacher: bool = False):  # fmt: skip
        # ``forward`` replaces the distiller's own forward (the benchmark's naive row uses it,
        # with its own eager models); ``attention`` is base.attention, for the student only.
        # ``teacher`` is None when a cache stands in for it (the causal logit arm).
        # ``parallel`` and ``shard_teacher`` are base's: DDP or FSDP2 when there are several
        # processes (one process trains its whole model either way).
        self.distiller, self.teacher, self.cfg = distiller, teacher, cfg
        self.precision, self.device, self.dist = precision, device, dist
        if forward is None:
            if distiller.eager_attention:  # the attention term reads the maps eager forms
                distiller.student.set_attn_implementation("eager")
            else:
                use_training_attention(distiller.student, attention, device)
            # Cheaper dropout masks on the CPU (kd/training/dropout.py), for the BERT family's
            # kernels; the naive benchmark row keeps torch's, as the common toolkits do.
            if distiller.fast_dropout:
                use_fast_dropout(distiller.student, device)
        if cfg.dropout is not None:
            set_dropout(distiller.student, cfg.dropout)
        distiller.to(device).train()
        if teacher is not None:
            teacher.to(device).eval()
        # FSDP replaces the parameters by sharded ones: shard before the optimiser and the
        # gradient-norm groups take hold of them.
        self.sharded = parallel == "fsdp" and dist.active
        if self.sharded:
            if cfg.attribution_every:  # the gate refuses this (kd.core.params.sharding_problem)
                raise SystemExit(f"{cfg.section}.attribution_every must be 0 under FSDP")
            sharded.shard_student(distiller)
            if shard_teacher and teacher is not None:
                sharded.shard_teacher(teacher)
        self.opt = optim.adamw(distiller, cfg.lr, cfg.weight_decay)
        self.sched = get_linear_schedule_with_warmup(
            self.opt, min(cfg.warmup_steps, n_steps), n_steps
        )
        self.n_steps = n_steps
        self.extra = list(distiller.extra_groups())  # projections, connectors: not the student
        self.groups = layer_groups(distiller.student, distiller.extra_groups())
        self.params = [p for g in self.groups.values() for p in g]
        self.share, self.micro, self.accum = split_batch(cfg.batch_size, dist.world,
                                                         cfg.micro_batch_size)
        self.model = distiller
        if dist.active and not self.sharded:
            # Unused parameters exist only when a scheme skips the head (no logit term).
            self.model = DistributedDataParallel(
                distiller, find_unused_parameters="logit" not in distiller.terms
            )
        self.forward = forward or (lambda mb: self.model(mb, self.teacher))

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The unweighted terms at the current weights, dropout off, no update."""
        self.distiller.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                return {k: float(v) for k, v in self.forward(batch).items()}
        finally:
            self.distiller.train()

    def attributes(self, step: int) -> bool:
        """Whether 0-based ``step`` also takes each term's own gradient (kd/training/attribution.py)."""
        every = self.cfg.attribution_every
        return bool(every) and (step + 1) % every == 0 and len(self.distiller.terms) > 1

    def step(self, full: dict[str, Tensor], step: int = 0,
             own: dict[str, Tensor] | None = None) -> tuple[dict, dict]:  # fmt: skip
        """Train on one global batch; returns (loss values, gradient norms), rank-averaged.

        ``own`` holds what this rank read for its share of the rows alone (``Batches.rows``),
        sliced into the micro-batches beside the global batch's rows.

        At attribution steps the norms also hold each term's own gradient norms per layer and
        the cosines between terms (``attr/...``), from this rank's share of the batch.
        """
        dist, distiller = self.dist, self.distiller
        distiller.set_progress(step, self.n_steps)  # scheduled temperature and weights
        self.opt.zero_grad(set_to_none=True)
        acc: dict[str, torch.Tensor] = {}
        attributing, per_term = self.attributes(step), None
        for m in range(self.accum):
            lo = dist.rank * self.share + m * self.micro
            mb = {k: v[lo : lo + self.micro] for k, v in full.items()}
            mb.update({k: v[m * self.micro : (m + 1) * self.micro] for k, v in (own or {}).items()})
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            last = m == self.accum - 1
            # Gradients are all-reduced (FSDP: reduce-scattered) once per step, on the last
            # micro-batch.
            sharded.set_gradient_sync(self.model, last)
            ddp_defer = dist.active and not self.sharded and not last
            sync = self.model.no_sync() if ddp_defer else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    terms = self.forward(mb)
                loss = distiller.total(terms)
                if attributing:
                    per_term = attribution.accumulate(
                        per_term,
                        attribution.term_gradients(terms, distiller.terms, self.params),
                        1 / self.accum,
                    )
                (loss / self.accum).backward()
            for k, v in {**terms, "total": loss}.items():
                acc[k] = acc.get(k, 0.0) + v.detach() / self.accum
        # One host sync for all terms.
        keys = list(acc)
        vals = torch.stack([acc[k].float() for k in keys]).tolist()
        values = dist_mean({f"loss/{k}": v for k, v in zip(keys, vals, strict=True)}, dist,
                           self.device)
        if not all(math.isfinite(v) for v in values.values()):
            s = self.cfg.section
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            raise NonFiniteLoss(
                f"the loss became non-finite at step {step} (terms: {', '.join(bad)}); the "
                f"weights were not updated and the last checkpoint is kept. Lower {s}.lr, "
                f"raise {s}.warmup_steps, or try base.precision: fp32"
            )
        norms = {f"grad_norm/{k}": v for k, v in grad_norms(self.groups, self.extra).items()}
        if per_term is not None:
            norms.update(attribution.summarize(per_term, self.params, self.groups, self.extra))
        clipped = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        norms["grad_norm/clipped"] = min(sharded.scalar(clipped), self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        return values, norms

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def train(
    distiller: nn.Module,
    teacher: nn.Module | None,
    batches: Batches,
    cfg: Train | CausalTrain,
    *,
    seed: int,
    precision: str,
    device: torch.device,
    attention: str = "auto",
    run,
    ckpt_dir,
    fingerprint: str,
    resume: dict | None = None,
    dist: Dist = SINGLE,
    flops_of: Callable[[dict[str, Tensor]], int] | None = None,
    parallel: str = "ddp",
    shard_teacher: bool = False,
) -> Result:
    """Distil for ``total_steps`` steps, logging every ``cfg.log_every``; resumable.

    ``parallel: fsdp`` checkpoints through DCP (kd/training/sharded.py), which a run under any
    process count resumes; ``ddp`` (and one process) writes one whole ``checkpoint.pt``, which
    does too: it holds whole weights, and the optimisation does not depend on the process count.

    The rows (and the CSV made of them) hold results only: the step, tokens and (given
    ``flops_of``, kd/training/flops.py) model FLOPs seen so far, the learning rate, every loss
    term and gradient norm. Wall time goes to MLflow (``time/...``) and ``Result.timing``.
    """
    n_blocks = len(batches)
    n_steps = total_steps(cfg, n_blocks)
    stepper = Stepper(distiller, teacher, cfg, n_steps, precision, device, dist,
                      attention=attention, parallel=parallel, shard_teacher=shard_teacher)
    dcp = parallel == "fsdp"  # DCP checkpoints, one process included (so N -> 1 -> M resume)
    result = Result()
    sums: dict[str, float] = {}
    start, elapsed, tokens, flop_count = 0, 0.0, 0, 0
    if resume is not None and (sharded.KEY in resume) != dcp:
        # base.parallel is in every stage's fingerprint, so this is a bug, not a user's switch.
        raise RuntimeError(f"a {'DCP' if sharded.KEY in resume else 'whole'} checkpoint under "
                           f"parallel={parallel}")
    # Every process must resume from the same step: a checkpoint folder that is not shared by
    # every node (multi-node) would have rank 0 resume while the others start over.
    kdist.same_everywhere(resume["step"] if resume else 0, dist, device, what=(
        f"the checkpoint in {ckpt_dir} (on several nodes, paths.checkpoints must be a folder "
        "every node shares)"))
    if resume is not None:
        if dcp:
            sharded.load(ckpt_dir, resume, stepper.model, stepper.opt)
            stepper.sched.load_state_dict(resume["scheduler"])
        else:
            distiller.load_state_dict(resume["distiller"])
            stepper.load_state_dict(resume)
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and resume.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(resume["rng_cuda"])
        start, elapsed, tokens = resume["step"], resume["seconds"], resume["tokens"]
        flop_count = resume["flops"]
        result.rows, sums = resume["rows"], resume["sums"]
        print(f"resuming from step {start} of {n_steps}")

    def save_checkpoint(step: int) -> None:
        if not dcp and not dist.main:
            return
        state = {
            "fingerprint": fingerprint,
            "step": step,
            "seconds": elapsed,
            "tokens": tokens,
            "flops": flop_count,
            "rows": result.rows,
            "sums": sums,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "mlflow_run_id": run.run_id,
        }
        if dcp:  # collective: every process writes its shards
            sharded.save(ckpt_dir, {**state, "scheduler": stepper.sched.state_dict()},
                         stepper.model, stepper.opt, dist)  # fmt: skip
            return
        checkpoint.save(ckpt_dir, {**state, "distiller": distiller.state_dict(),
                                   **stepper.state_dict()})  # fmt: skip

    bar = tqdm(total=n_steps, initial=start, desc="distil", unit="step", mininterval=5,
               disable=not dist.main)
    step = start
    try:
        with interrupt.deferred() as stop:
            while step < n_steps:
                t0 = time.perf_counter()
                gen = step_generator(seed, step)
                idx = batch_indices(n_blocks, cfg.batch_size, seed, step)
                # The whole global batch is built (masked, continued) on every rank, then
                # sliced: a row never depends on how many processes share the batch.
                full = batches(idx, gen)
                mine = idx[dist.rank * stepper.share : (dist.rank + 1) * stepper.share]
                values, norms = stepper.step(full, step, batches.rows(mine))
                step += 1
                elapsed += time.perf_counter() - t0
                tokens += token_count(full)
                if flops_of is not None:
                    flop_count += flops_of(full)
                for k, v in {**values, **norms}.items():
                    # attr/ values exist only at attribution steps: averaged over those (below).
                    sums[k] = sums.get(k, 0.0) + v
                if step % cfg.log_every == 0 or step == n_steps:
                    row = {
                        "step": step,
                        "tokens": tokens,
                        **({"flops": flop_count} if flops_of is not None else {}),
                        "lr": stepper.sched.get_last_lr()[0],
                        **values,
                        **norms,
                    }
                    result.rows.append(row)
                    # Wall time beside the row, in MLflow only: the row is a result.
                    logged = {k: v for k, v in row.items() if k != "step"}
                    run.log_metrics({**logged, "time/seconds": elapsed}, step=step)
                    bar.set_postfix(loss=f"{values['loss/total']:.3f}")
                if step % cfg.checkpoint_every == 0 and step < n_steps:
                    save_checkpoint(step)
                bar.update(1)
                # A signal asked to stop: the step it landed in has finished, counter included.
                if kdist.any_rank(stop.requested, dist, device) and step < n_steps:
                    save_checkpoint(step)
                    bar.close()
                    raise interrupt.stopped(step, ckpt_dir)
    except KeyboardInterrupt:
        # A second Ctrl-C, anywhere in a step: nothing consistent to save now.
        bar.close()
        raise interrupt.stopped_again(step, ckpt_dir) from None
    bar.close()
    n_attr = sum(stepper.attributes(s) for s in range(step))
    result.summary = {
        "steps": step,
        "epochs": step * cfg.batch_size / n_blocks,
        "tokens": tokens,
        **({"flops": flop_count} if flops_of is not None else {}),
        **{f"mean/{k}": v / max(step, 1) for k, v in sums.items()
           if not k.startswith(attribution.PREFIX)},
        **{f"mean/{k}": v / max(n_attr, 1) for k, v in sums.items() if k.startswith(attribution.PREFIX)},
        "attribution_steps": n_attr,
        **{f"final/{k}": v for k, v in result.rows[-1].items() if k.startswith("loss/")},
    }
    if stepper.sharded:
        result.state = sharded.full_state(stepper.model)
    result.timing = {
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "sequences_per_s": step * cfg.batch_size / elapsed if elapsed else 0.0,
    }
    return result
