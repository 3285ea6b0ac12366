"""Judge one distilled student against the teacher on fixed batches, batch by batch.

The batches are the first ``train_batches`` of the train split and the first ``test_batches`` of
the test split (all of it by default), in order, with the tokenize stage's *fixed* masks
(``mlm_input_ids`` / ``mlm_labels``): every arm, every experiment, sees exactly the same inputs.
The teacher runs once per batch and serves every number of that batch.

Every student is scored at the same positions, the fixed masked ones, whatever positions its
scheme trained on, so schemes rank on one measure. Per batch (one row per batch per split; the
original study's Figures 3-4 plot these):
  logit_kl_t1       KL(p_T ‖ p_S) at T = 1: the logit loss every comparison uses
  logit_kl_train_t  T² · KL at the temperature T the scheme trained with at its last step (its
                    schedule's end): the training objective's own scale, an extra column
  agreement         share of those positions where student and teacher argmax agree
  mlm_loss, top1, top5     cross-entropy and accuracy against the true tokens, masked positions
  teacher_mlm_loss, teacher_top1, teacher_top5   the teacher's, as a reference
Test batches only (held-out intermediate fidelity, judged the same way for every arm):
  embedding_lstsq, hidden_lstsq/layer_i   MSE (kd.distill.losses.hidden_mse) between the teacher's state
      and the student's mapped through a least-squares projection fitted on ``lstsq_batches``
      train batches (kd/evaluation/lstsq.py); ``hidden_lstsq`` sums the layers, as the training term does
  embedding_learned, hidden_learned/...   the same through the arm's learned projections, if any
  attention_probs/layer_i, attention_scores/layer_i   kd.distill.losses.attention_mse on softmaxed and
      on pre-softmax attention (no projection: heads compare one to one when the counts match)
Student layer i is compared with teacher layer ``layer_map[i-1]``; the embeddings with the
teacher's embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import Tensor, nn

from kd.core.params import Evaluate, Scheme
from kd.core.runtime import autocast
from kd.data.masking import IGNORE
from kd.distill import losses, schedules
from kd.distill.distiller import Reps, forward_reps, mlm_head
from kd.distill.hooks import attention_probs
from kd.distill.layermap import resolve_layer_map
from kd.distill.projections import Projections
from kd.evaluation.lstsq import LinearFit, apply

# Which count weighs a column when per-batch values are averaged: a mean over positions, not
# over batches, so a ragged last batch counts for what it holds.
_WEIGHT = {
    "logit_kl_train_t": "n_positions",
    "logit_kl_t1": "n_positions",
    "agreement": "n_positions",
}
_MASKED = ("mlm_loss", "top1", "top5", "teacher_mlm_loss", "teacher_top1", "teacher_top5")
_COUNTS = ("n_positions", "n_masked", "n_tokens")
# Column names in the per-batch CSV -> names in the metrics JSON.
_RENAME = {
    "top1": "mlm_top1",
    "top5": "mlm_top5",
    "teacher_top1": "teacher_mlm_top1",
    "teacher_top5": "teacher_mlm_top5",
}


@dataclass(frozen=True)
class Judge:
    """The scheme-specific part of the judging: the temperature its logit term ended training at
    (only for ``logit_kl_train_t``; every score that compares students is at T = 1) and which
    teacher layer each student layer is compared with."""

    temperature: float = 1.0
    layer_map: str | list[int] = "uniform"

    @classmethod
    def of(cls, scheme: Scheme) -> Judge:
        return cls(schedules.final(scheme.temperature_schedule, scheme.temperature),
                   scheme.layer_map)


@dataclass
class Result:
    rows: list[dict] = field(default_factory=list)
    layer_map: list[int] = field(default_factory=list)
    fit_tokens: int = 0
    attention: bool = True


def fixed_batches(ds: Dataset, batch_size: int, n: int | None) -> Iterator[dict[str, Tensor]]:
    """The first ``n`` batches of ``ds`` in order (all when ``n`` is None), fixed masks."""
    n_all = math.ceil(len(ds) / batch_size)
    for b in range(n_all if n is None else min(n, n_all)):
        rows = ds[b * batch_size : (b + 1) * batch_size]
        yield {
            "input_ids": torch.as_tensor(rows["mlm_input_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(rows["attention_mask"], dtype=torch.long),
            "labels": torch.as_tensor(rows["mlm_labels"], dtype=torch.long),
        }


def mlm_metrics(logits: Tensor, labels: Tensor, prefix: str = "") -> dict[str, float]:
    """Masked-LM cross-entropy and top-1/top-5 accuracy of [N, V] logits against [N] tokens."""
    if logits.shape[0] == 0:
        return {f"{prefix}mlm_loss": math.nan, f"{prefix}top1": math.nan, f"{prefix}top5": math.nan}
    logits = logits.float()
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top == labels[:, None]
    return {
        f"{prefix}mlm_loss": F.cross_entropy(logits, labels).item(),
        f"{prefix}top1": hit[:, 0].float().mean().item(),
        f"{prefix}top5": hit.any(-1).float().mean().item(),
    }


def logit_metrics(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float | None = None
) -> dict[str, float]:
    """Every logit-level number of one batch, from [N, V] logits at the scored positions.

    ``labels`` [N] holds the true token at masked positions and IGNORE elsewhere: the KL and the
    agreement use all N positions, the masked-LM numbers only the masked ones. ``temperature``
    adds ``logit_kl_train_t``, the KL at that temperature (× T²).
    """
    s, t = student_logits.float(), teacher_logits.float()
    n = s.shape[0]
    out: dict[str, float] = {"n_positions": n}
    if n:
        out["logit_kl_t1"] = losses.logit_kl(s, t, 1.0).item()
        if temperature is not None:
            out["logit_kl_train_t"] = (
                out["logit_kl_t1"] if temperature == 1 else losses.logit_kl(s, t, temperature).item()
            )
        out["agreement"] = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    else:
        out.update(logit_kl_t1=math.nan, agreement=math.nan)
        if temperature is not None:
            out["logit_kl_train_t"] = math.nan
    masked = labels != IGNORE
    out["n_masked"] = int(masked.sum())
    out.update(mlm_metrics(s[masked], labels[masked]))
    out.update(mlm_metrics(t[masked], labels[masked], prefix="teacher_"))
    return out


def _forward(
    model: nn.Module,
    batch: dict[str, Tensor],
    layers: list[int],
    where: Tensor | None,
    reps: bool,
    attention: bool,
    device: torch.device,
    precision: str,
) -> tuple[Reps, Tensor | None]:
    with autocast(device, precision):
        out = forward_reps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            layers if reps else [],
            embedding=reps,
            attention=reps and attention,
        )
        logits = mlm_head(model)(out.last[where]) if where is not None else None
    return out, logits


def has_map(projections: Projections, index: int) -> bool:
    """Whether the learned projections map student index ``index`` (0 = embeddings)."""
    return projections.shared or str(index) in projections.maps


def distances(
    s: Reps,
    t: Reps,
    mask: Tensor,
    fits: list[tuple[Tensor, Tensor]],
    projections: Projections | None,
    attention: bool,
) -> dict[str, float]:
    """Held-out intermediate distances of one batch (see the module docstring)."""
    out: dict[str, float] = {}

    def per_layer(name: str, values: list[Tensor]) -> None:
        for i, v in enumerate(values, start=1):
            out[f"{name}/layer_{i}"] = v.item()
        out[name] = sum(v.item() for v in values)

    s_states = [s.embedding, *s.hidden]
    t_states = [t.embedding, *t.hidden]
    mapped = [
        losses.hidden_mse(apply(x, *fit), y, mask)
        for x, y, fit in zip(s_states, t_states, fits, strict=True)
    ]
    out["embedding_lstsq"] = mapped[0].item()
    per_layer("hidden_lstsq", mapped[1:])
    if projections is not None:
        learned = {
            i: losses.hidden_mse(projections(x.float(), i), y, mask)
            for i, (x, y) in enumerate(zip(s_states, t_states, strict=True))
            if has_map(projections, i)
        }
        if 0 in learned:
            out["embedding_learned"] = learned[0].item()
        if all(i in learned for i in range(1, len(s_states))):
            per_layer("hidden_learned", [learned[i] for i in range(1, len(s_states))])
    if attention:
        per_layer(
            "attention_probs",
            [
                losses.attention_mse(attention_probs(a), attention_probs(b), mask)
                for a, b in zip(s.scores, t.scores, strict=True)
            ],
        )
        per_layer(
            "attention_scores",
            [losses.attention_mse(a, b, mask) for a, b in zip(s.scores, t.scores, strict=True)],
        )
    return out


def evaluate(
    teacher: nn.Module,
    student: nn.Module,
    train: Dataset,
    test: Dataset,
    cfg: Evaluate,
    judge: Judge,
    *,
    projections: Projections | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Result:
    """Score ``student`` against ``teacher``: one row per fixed batch per split."""
    device = torch.device(device)
    s_cfg, t_cfg = student.config, teacher.config
    n_layers = s_cfg.num_hidden_layers
    result = Result(
        layer_map=resolve_layer_map(judge.layer_map, n_layers, t_cfg.num_hidden_layers),
        attention=s_cfg.num_attention_heads == t_cfg.num_attention_heads,
    )
    s_layers = list(range(1, n_layers + 1))
    teacher.to(device).eval()
    student.to(device).eval()
    if projections is not None:
        projections.to(device).eval()
    run = dict(device=device, precision=precision, attention=result.attention)

    def both(batch: dict[str, Tensor], logits: bool, reps: bool):
        batch = {k: v.to(device) for k, v in batch.items()}
        where = (batch["labels"] != IGNORE) if logits else None  # the fixed masked positions
        t, t_logits = _forward(teacher, batch, result.layer_map, where, reps, **run)
        s, s_logits = _forward(student, batch, s_layers, where, reps, **run)
        row = (
            logit_metrics(s_logits, t_logits, batch["labels"][where], judge.temperature)
            if logits
            else {}
        )
        row["n_tokens"] = int(batch["attention_mask"].sum())
        return batch, s, t, row

    with torch.inference_mode():
        fits = [LinearFit() for _ in range(n_layers + 1)]
        n_train, n_fit = cfg.train_batches, cfg.lstsq_batches
        # One pass over the train batches serves both the scores and the least-squares fit.
        for b, batch in enumerate(fixed_batches(train, cfg.batch_size, max(n_train, n_fit))):
            batch, s, t, row = both(batch, logits=b < n_train, reps=b < n_fit)
            if b < n_train:
                result.rows.append({"split": "train", "batch": b, **row})
            if b < n_fit:
                real = batch["attention_mask"].bool()
                for fit, x, y in zip(
                    fits, [s.embedding, *s.hidden], [t.embedding, *t.hidden], strict=True
                ):
                    fit.update(x[real], y[real])
        result.fit_tokens = fits[0].n
        solved = [fit.solve() for fit in fits]
        for b, batch in enumerate(fixed_batches(test, cfg.batch_size, cfg.test_batches)):
            batch, s, t, row = both(batch, logits=True, reps=True)
            row.update(
                distances(s, t, batch["attention_mask"], solved, projections, result.attention)
            )
            result.rows.append({"split": "test", "batch": b, **row})
    return result


def _weight(column: str) -> str:
    if column in _WEIGHT:
        return _WEIGHT[column]
    return "n_masked" if column in _MASKED else "n_tokens"


def summarize(rows: list[dict]) -> dict[str, float]:
    """Means per split, ``<split>/<metric>``, weighted by the positions (or tokens) behind each
    batch's value; batches where a value is undefined (e.g. no masked position) are skipped."""
    out: dict[str, float] = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        part = [r for r in rows if r["split"] == split]
        out[f"{split}/batches"] = len(part)
        for count in _COUNTS:
            out[f"{split}/{count.removeprefix('n_')}"] = sum(r.get(count, 0) for r in part)
        columns = dict.fromkeys(k for r in part for k in r)
        for col in columns:
            if col in ("split", "batch", *_COUNTS):
                continue
            pairs = [
                (r[col], r.get(_weight(col), 0))
                for r in part
                if col in r and r[col] is not None and math.isfinite(r[col])
            ]
            total = sum(w for _, w in pairs)
            out[f"{split}/{_RENAME.get(col, col)}"] = (
                sum(v * w for v, w in pairs) / total if total else math.nan
            )
    return out
