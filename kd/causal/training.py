"""The causal arms' training loop: the same optimisation, logging and resumption as the MLM arms'.

Each step: a batch of full blocks in a seeded order (``kd.training.loop.batch_indices``, as the
MLM loop), optionally with GKD's on-policy rows written by the student (``kd.causal.onpolicy``),
the arm's terms (``kd.causal.distiller.terms``: the chunked logit term against the teacher cache
or the online teacher, and the multi arm's representation terms), backward, per-layer gradient
norms before clipping, clip, AdamW, linear warmup and decay. The randomness of step ``k`` is a
function of (seed, k) and the checkpoint holds the RNG state, so an interrupted run resumes to
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import Parameter
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from kd.causal.cache import Cache
from kd.causal.distiller import Projections, Scheme, terms
from kd.causal.divergences import TopK
from kd.causal.onpolicy import mix_in_student_text
from kd.causal.students import blocks_path
from kd.core import optim
from kd.core.params import CausalScheme, CausalTrain
from kd.core.runtime import autocast
from kd.training import checkpoint, interrupt
from kd.training.gradnorm import grad_norms
from kd.training.loop import NonFiniteLoss, batch_indices, step_generator

PROJECTIONS = "projections"


def layer_groups(model: nn.Module, extra: dict[str, nn.Module] | None = None
                 ) -> dict[str, list[Parameter]]:  # fmt: skip
    """The trainable parameters of a decoder-only LM in named groups, as the MLM family's
    (kd.training.gradnorm.layer_groups): "embeddings", "layer_0" … "layer_{n-1}", "head" (an
    untied LM head), the ``extra`` modules, and "other" (the final norm). A tied head is the
    embedding matrix, counted once under "embeddings"."""
    modules: dict[str, nn.Module] = {"embeddings": model.get_input_embeddings()}
    for i, block in enumerate(model.get_submodule(blocks_path(model))):
        modules[f"layer_{i}"] = block
    modules["head"] = model.get_output_embeddings()
    modules.update(extra or {})
    seen: set[int] = set()
    groups: dict[str, list[Parameter]] = {}
    for name, module in [*modules.items(), ("other", model)]:
        fresh = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in fresh)
        if fresh or name != "other":
            groups[name] = fresh
    if not groups["head"]:
        del groups["head"]
    return groups


def layer_map(scheme: CausalScheme, kept: list[int] | None, n_student: int, n_teacher: int
              ) -> list[int]:  # fmt: skip
    """1-based teacher blocks the student's blocks imitate: the scheme's list; for ``auto``, the
    blocks a layer-subset student was cut from (``kept``, 1-based), else the uniform map
    ceil(i · Lt / Ls) of the MLM family."""
    if scheme.layer_map != "auto":
        return list(scheme.layer_map)
    if kept is not None:
        return list(kept)
    return [math.ceil(i * n_teacher / n_student) for i in range(1, n_student + 1)]


class CausalDistiller(nn.Module):
    """The student, its projections to the teacher's width (multi arm only) and the arm's terms."""

    def __init__(self, student: nn.Module, teacher_width: int, scheme: CausalScheme,
                 layers: list[int]):  # fmt: skip
        super().__init__()
        self.student = student
        self.layer_map = layers
        w = scheme.terms
        self.scheme = Scheme(
            logit=w.get("logit", 0.0), hidden=w.get("hidden", 0.0),
            attention=w.get("attention", 0.0), embedding=w.get("embedding", 0.0),
            divergence=scheme.divergence, beta=scheme.beta, alpha=scheme.alpha,
            temperature=scheme.temperature, representation_loss=scheme.representation_loss,
        )  # fmt: skip
        self.terms = [t for t in ("logit", "hidden", "attention", "embedding")
                      if getattr(self.scheme, t) > 0]  # fmt: skip
        self.projections = None
        if self.scheme.needs_representations():
            self.projections = Projections(
                student.config.hidden_size, teacher_width, 1 + student.config.num_hidden_layers
            )

    def extra_groups(self) -> dict[str, nn.Module]:
        return {} if self.projections is None else {PROJECTIONS: self.projections}

    def forward(self, input_ids: Tensor, teacher: nn.Module | None, cache=None) -> dict[str, Tensor]:
        return terms(self.student, teacher, input_ids, self.scheme, self.layer_map,
                     self.projections, cache)  # fmt: skip


@dataclass
class Result:
    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)  # wall clock: MLflow only


def train(
    distiller: CausalDistiller,
    teacher: nn.Module | None,
    blocks: Tensor,
    cache: Cache | None,
    cfg: CausalTrain,
    *,
    seed: int,
    device: torch.device,
    precision: str,
    run,
    ckpt_dir,
    fingerprint: str,
    resume: dict | None = None,
) -> Result:
    """Distil for ``cfg.max_steps`` steps on ``blocks`` [N, L] (token ids of full blocks).

    ``cache`` (row-aligned with ``blocks``) replaces the teacher for the logit term; ``teacher``
    is needed for the representation terms and for on-policy rows, whose text the cache never
    saw. Rows hold results only (step, tokens, lr, every term, gradient norms); wall time goes to
    MLflow and ``Result.timing``.
    """
    n = len(blocks)
    if n < cfg.batch_size:
        raise SystemExit(
            f"the causal train split has {n} blocks, fewer than causal.train.batch_size="
            f"{cfg.batch_size}: raise causal.train_blocks (or the corpus) or lower the batch size"
        )
    if cfg.onpolicy and teacher is None:
        raise ValueError("on-policy rows need the online teacher")
    distiller.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = optim.adamw(distiller, cfg.lr, cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.max_steps),
                                            cfg.max_steps)  # fmt: skip
    groups = layer_groups(distiller.student, distiller.extra_groups())
    extra = tuple(distiller.extra_groups())
    result, sums = Result(), {}
    start, elapsed, tokens = 0, 0.0, 0
    if resume is not None:
        distiller.load_state_dict(resume["distiller"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng_cpu"])
        start, elapsed, tokens = resume["step"], resume["seconds"], resume["tokens"]
        result.rows, sums = resume["rows"], resume["sums"]
        print(f"resuming from step {start} of {cfg.max_steps}")

    def save(step: int) -> None:
        checkpoint.save(ckpt_dir, {
            "fingerprint": fingerprint, "step": step, "seconds": elapsed, "tokens": tokens,
            "rows": result.rows, "sums": sums, "distiller": distiller.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng_cpu": torch.get_rng_state(), "mlflow_run_id": run.run_id,
        })  # fmt: skip

    bar = tqdm(total=cfg.max_steps, initial=start, desc="distil", unit="step", mininterval=5)
    step = start
    try:
        with interrupt.deferred() as stop:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                idx = batch_indices(n, cfg.batch_size, seed, step)
                ids = blocks[idx].to(device)
                target = None if cache is None or cfg.onpolicy else cache.support(idx)
                if target is not None:
                    target = TopK(target.ids.to(device), target.logprobs.to(device),
                                  None if target.rest is None else target.rest.to(device))
                if cfg.onpolicy:
                    # A seed per step: the same rows get the same continuation on a resume.
                    gen_seed = int(torch.randint(2**31 - 1, (1,),
                                                 generator=step_generator(seed, step)))
                    ids, _ = mix_in_student_text(distiller.student, ids, cfg.onpolicy,
                                                 cfg.onpolicy_prompt, gen_seed,
                                                 cfg.onpolicy_temperature)  # fmt: skip
                opt.zero_grad(set_to_none=True)
                with autocast(device, precision):
                    out = distiller(ids, teacher, target)
                out["total"].backward()
                values = {f"loss/{k}": float(v.detach()) for k, v in out.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise NonFiniteLoss(
                        f"the loss became non-finite at step {step}; the weights were not "
                        "updated. Lower causal.train.lr or raise causal.train.warmup_steps"
                    )
                norms = {f"grad_norm/{k}": v for k, v in grad_norms(groups, extra).items()}
                clipped = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                norms["grad_norm/clipped"] = min(float(clipped), cfg.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                elapsed += time.perf_counter() - t0
                tokens += ids.numel()
                for k, v in {**values, **norms}.items():
                    sums[k] = sums.get(k, 0.0) + v
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    row = {"step": step, "tokens": tokens, "lr": sched.get_last_lr()[0],
                           **values, **norms}  # fmt: skip
                    result.rows.append(row)
                    logged = {k: v for k, v in row.items() if k != "step"}
                    run.log_metrics({**logged, "time/seconds": elapsed}, step=step)
                    bar.set_postfix(loss=f"{values['loss/total']:.3f}")
                if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    save(step)
                bar.update(1)
                if stop.requested and step < cfg.max_steps:
                    save(step)
                    bar.close()
                    raise interrupt.stopped(step, ckpt_dir)
    except KeyboardInterrupt:
        bar.close()
        raise interrupt.stopped_again(step, ckpt_dir) from None
    bar.close()
    result.summary = {
        "steps": step,
        "tokens": tokens,
        **{f"mean/{k}": v / max(step, 1) for k, v in sums.items()},
        **{f"final/{k}": v for k, v in result.rows[-1].items() if k.startswith("loss/")},
    }
    result.timing = {"seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0}
    return result
