"""Benchmark of the distillation training step: how fast, how much memory, how close to peak.

    python -m kd.bench                    # the default shapes of params.yaml; data/bench/bench.json
    python -m kd.bench --quick            # tiny step counts and shapes: a smoke test in seconds
    python -m kd.bench --profile          # torch.profiler over a few steps of the multi arm

For each arm (params.yaml ``loss.arms``) it times the full training step of kd/training/loop.py (teacher
and student forward, loss terms, backward, per-layer gradient norms, clipping, AdamW, schedule)
in four ways, side by side on identical weights, batches and loss terms, so that only the ratios
matter on a shared machine:

  naive          HF models with ``output_hidden_states`` and eager ``output_attentions``, MLM
                 logits over the whole vocabulary at every position then gathered; fp32; the
                 teacher under ``torch.no_grad``
  textbrewer     TextBrewer's ``GeneralDistiller`` configured for the same terms (its own step:
                 ``train_on_batch``, backward, clip, AdamW); the exception if it cannot run
  project_fp32   this project's step (kd/distill/distiller.py), fp32
  project_bf16   the same under bf16 autocast
  project_bf16_sdpa   the same with the student on the fused SDPA kernel, where ``base.attention``
                 picks another one (on the CPU, eager: kd/core/runtime.py says why), so the lever's
                 effect is measured in the same run

Before timing, every row computes its terms on the same batch from the same initial weights with
dropout off, and each term must agree with the naive row's (tight in fp32, loose in bf16). Then it
measures how cost grows with sequence length and batch size (project step, default precision).
Throughput is the median step; model FLOPs come from the shapes (kd/training/flops.py) and the model FLOP
utilisation divides by a matmul peak measured in the same run for the row's dtype.

Peak memory is the process's resident high-water mark (``VmHWM``), reset before each row through
``/proc/self/clear_refs``; where that is unavailable it falls back to ``ru_maxrss``, a lifetime
peak that only grows (the JSON says which).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from kd.core.optim import param_groups
from kd.core.params import Scheme, Train
from kd.core.runtime import attention_implementation, bf16_supported, keep_freed_memory
from kd.data.masking import mask_tokens
from kd.distill import losses
from kd.distill.distiller import Distiller, logit_positions
from kd.training import flops
from kd.training.loop import Stepper, set_dropout

ROWS = ("naive", "textbrewer", "project_fp32", "project_bf16", "project_bf16_sdpa")
REFERENCE = "naive"  # the row every other row's terms are checked against


@dataclass(frozen=True)
class Shape:
    batch_size: int
    seq_len: int
    mlm_probability: float = 0.15


@dataclass(frozen=True)
class BenchConfig:
    steps: int = 10  # timed steps per row; the median is reported
    warmup: int = 3  # untimed steps first (allocator, oneDNN kernel selection, lazy init)
    n_batches: int = 4  # distinct batches cycled through: fresh masks, as in training
    seed: int = 0
    precision: str = "bf16"  # the project's default precision: the sweep and the profile use it
    attention: str = "auto"  # base.attention: the student's attention kernel in the project rows
    dropout: float | None = None  # train.dropout: the student's dropout in every row
    lr: float = 5e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    matmul_n: int = 2048  # side of the square matmul that measures the peak
    matmul_repeats: int = 5
    textbrewer: bool = True
    sweep: bool = True
    sweep_seq: tuple[int, ...] = (64, 128, 256, 512)
    sweep_batch: tuple[int, ...] = (8, 16)
    sweep_steps: int = 5
    sweep_warmup: int = 2
    # Agreement of the terms with the naive row: |x - ref| <= atol + rtol·|ref|.
    fp32_rtol: float = 1e-4
    fp32_atol: float = 1e-6
    bf16_rtol: float = 5e-2
    bf16_atol: float = 1e-3


QUICK = dict(
    steps=2,
    warmup=1,
    n_batches=2,
    matmul_n=512,
    matmul_repeats=3,
    sweep_seq=(32, 64),
    sweep_batch=(2, 4),
    sweep_steps=2,
    sweep_warmup=1,
)
QUICK_SHAPE = Shape(batch_size=4, seq_len=32)


# ----------------------------------------------------------------------------- measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time what ran, not what queued


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    # Give freed heap back to the OS so one row's leftovers do not count as the next row's.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident memory over a block, in MiB, and how much the block added to the start."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM (reset per row via /proc/self/clear_refs)"
        except OSError:
            self.method = "ru_maxrss (process lifetime peak: later rows include earlier ones)"
        self.start_kib = _status_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        # ru_maxrss is in KiB on Linux.
        self.peak_kib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @property
    def peak_mib(self) -> float:
        return round(self.peak_kib / 1024, 1)

    @property
    def added_mib(self) -> float:
        return round(max(self.peak_kib - self.start_kib, 0) / 1024, 1)


def matmul_peak(n: int, dtype: torch.dtype, repeats: int, device: torch.device) -> float:
    """Best observed GFLOP/s of an n×n by n×n matmul (2·n³ FLOPs) with torch's threads.

    Each timing covers enough back-to-back products to last ≥ 20 ms: one product on a GPU takes
    tens of microseconds, about what a host timer and a sync cost, which would understate the
    peak. On CUDA n is at least 8192 (a 2048³ product does not fill an H100).
    """
    if device.type == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def timed(k: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            torch.matmul(a, b, out=out)
        _sync(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up: kernel selection, caches, clocks
    inner = 1
    while (t := timed(inner)) < 0.02 and inner < 4096:
        inner *= 4
    best = t / inner
    for _ in range(repeats):
        best = min(best, timed(inner) / inner)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------- data and models


def make_batches(vocab_size: int, shape: Shape, n: int, seed: int) -> list[dict[str, Tensor]]:
    """``n`` packed blocks of random word pieces with fresh MLM masks (kd/data/masking.py).

    Blocks are full, as the tokenize stage packs them: [CLS] … [SEP], no padding. The ids are
    random: the step's cost does not depend on which words it sees.
    """
    big = vocab_size > 2000
    cls_id, sep_id, mask_id = (101, 102, 103) if big else (1, 2, 3)
    low = 1000 if big else 5
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(low, vocab_size, (shape.batch_size, shape.seq_len), generator=gen)
        ids[:, 0], ids[:, -1] = cls_id, sep_id
        special = torch.zeros_like(ids)
        special[:, 0] = special[:, -1] = 1
        input_ids, labels = mask_tokens(
            ids, special, mask_id, vocab_size, shape.mlm_probability, gen
        )
        out.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        )
    return out


def eager_copy(model: nn.Module) -> nn.Module:
    """The same weights under eager attention, the only kind that returns attention maps."""
    from transformers import AutoModelForMaskedLM

    config = copy.deepcopy(model.config)
    twin = AutoModelForMaskedLM.from_config(config, attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    return twin.to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)


def naive_terms(distiller: Distiller, teacher: nn.Module, batch: dict[str, Tensor]) -> dict:
    """The scheme's terms the way common toolkits compute them.

    Every hidden state and eager attention probabilities from the HF outputs, logits over the
    whole vocabulary at every position (then gathered), the teacher under ``torch.no_grad``.
    Same formulas (kd/distill/losses.py) and same projections as :class:`~kd.distill.distiller.Distiller`.
    """
    scheme, terms = distiller.scheme, distiller.terms
    if "attention" in terms and scheme.attention_target != "probs":
        raise ValueError(
            "HF models return attention probabilities only; the naive way cannot give the "
            "pre-softmax scores that attention_target: scores asks for"
        )
    kw = {
        "output_hidden_states": "embedding" in terms or "hidden" in terms,
        "output_attentions": "attention" in terms,
    }
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s = distiller.student(ids, attention_mask=mask, **kw)
    with torch.no_grad():
        t = teacher(ids, attention_mask=mask, **kw)
    proj, layer_map = distiller.projections, distiller.layer_map
    out = {}
    if "embedding" in terms:
        out["embedding"] = losses.hidden_mse(proj(s.hidden_states[0], 0), t.hidden_states[0], mask)
    if "hidden" in terms:
        out["hidden"] = sum(
            losses.hidden_mse(proj(s.hidden_states[i], i), t.hidden_states[m], mask)
            for i, m in enumerate(layer_map, start=1)
        )
    if "attention" in terms:
        out["attention"] = sum(
            losses.attention_mse(s.attentions[i - 1], t.attentions[m - 1], mask)
            for i, m in enumerate(layer_map, start=1)
        )
    if "logit" in terms:
        where = logit_positions(batch, scheme.logit_positions)
        out["logit"] = losses.logit_kl(s.logits[where], t.logits[where], scheme.temperature)
    return out


# ----------------------------------------------------------------------------- the rows


@dataclass
class Start:
    """What every row of an arm starts from: the same weights, the same projections."""

    teacher: nn.Module  # the project's teacher (SDPA)
    teacher_eager: nn.Module  # the same weights, eager attention
    student: nn.Module  # initial student (SDPA); rows train copies
    projections: dict[str, Tensor] | None  # initial projection weights


def _fresh(start: Start, scheme: Scheme, eager: bool) -> Distiller:
    student = eager_copy(start.student) if eager else copy.deepcopy(start.student)
    teacher = start.teacher_eager if eager else start.teacher
    d = Distiller(student, teacher, scheme)
    if start.projections is not None:
        d.projections.load_state_dict(start.projections)
    return d.to(next(start.student.parameters()).device)


def _train_cfg(cfg: BenchConfig, batch_size: int) -> Train:
    return Train(batch_size=batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                 max_grad_norm=cfg.max_grad_norm, warmup_steps=2, dropout=cfg.dropout)


def project_row(start, scheme, precision, cfg, device, batch_size,
                attention: str | None = None) -> Stepper:
    """This project's step: exactly kd/training/loop.py's Stepper, as the training stage runs it
    (``attention`` overrides ``cfg.attention``)."""
    d = _fresh(start, scheme, eager=False)
    return Stepper(d, start.teacher, _train_cfg(cfg, batch_size), 10**6, precision, device,
                   attention=attention or cfg.attention)


def naive_row(start, scheme, cfg, device, batch_size) -> Stepper:
    """The same optimisation step around the naive forward (all hidden states, eager
    attentions, full-vocabulary logits, fp32)."""
    d = _fresh(start, scheme, eager=True)
    return Stepper(d, start.teacher_eager, _train_cfg(cfg, batch_size), 10**6, "fp32", device,
                   forward=lambda b: naive_terms(d, start.teacher_eager, b))


class _Adaptor:
    """TextBrewer adaptor: HF outputs -> the dict its losses read.

    ``where`` (the positions the logit term scores) is set before each batch: TextBrewer passes
    the batch to the models as keyword arguments, so labels cannot travel in it without making
    the HF model compute its own MLM loss.
    """

    def __init__(self, terms: dict[str, float]):
        self.terms = terms
        self.where: Tensor | None = None

    def __call__(self, batch, out) -> dict:
        r = {"inputs_mask": batch["attention_mask"]}
        if "logit" in self.terms:
            r["logits"], r["logits_mask"] = out.logits, self.where
        if "embedding" in self.terms or "hidden" in self.terms:
            r["hidden"] = out.hidden_states
        if "attention" in self.terms:
            r["attention"] = out.attentions
        return r


def textbrewer_matches(scheme: Scheme, layer_map: list[int], d_s: int, d_t: int) -> list[dict]:
    """TextBrewer ``intermediate_matches`` for the scheme's embedding, hidden, attention terms.

    Hidden states are indexed as HF returns them (0 = embedding output, i = layer i); attention
    maps from layer 1 at index 0. Each hidden match gets its own linear projection (no
    activation), as the project's ``per_layer`` projections.
    """
    terms = scheme.active_terms
    proj = ["linear", d_s, d_t]
    out = []
    if "embedding" in terms:
        out.append(dict(layer_T=0, layer_S=0, feature="hidden", loss="hidden_mse",
                        weight=terms["embedding"], proj=list(proj)))
    if "hidden" in terms:
        out += [dict(layer_T=m, layer_S=i, feature="hidden", loss="hidden_mse",
                     weight=terms["hidden"], proj=list(proj))
                for i, m in enumerate(layer_map, start=1)]
    if "attention" in terms:
        out += [dict(layer_T=m - 1, layer_S=i - 1, feature="attention", loss="attention_mse",
                     weight=terms["attention"])
                for i, m in enumerate(layer_map, start=1)]
    return out


def _term_of(match: dict) -> str:
    if match["feature"] == "attention":
        return "attention"
    return "embedding" if match["layer_S"] == 0 else "hidden"


class TextBrewerStep:
    """TextBrewer's ``GeneralDistiller`` on eager copies of the same weights.

    The step is the body of its ``train_with_num_steps`` loop: ``train_on_batch`` (teacher under
    ``no_grad``), ``write_loss``, backward, clip the student's gradients, AdamW (its projections
    added by ``initialize_training``). It computes no per-layer gradient norms, so it does a
    little less than the other rows.

    TextBrewer's logit loss (``kd_loss_type='ce'``) is the cross-entropy
    −Σ softmax(z_T/T)·log softmax(z_S/T), without T²: KL plus the teacher's entropy H_T, which has
    no gradient. For the agreement check its value is turned into this project's term,
    T²·(CE − H_T); the training step is left as TextBrewer runs it.
    """

    def __init__(self, start: Start, scheme: Scheme, cfg: BenchConfig, device: torch.device):
        import textbrewer

        self.version = textbrewer.__version__
        self.scheme, self.terms_w = scheme, scheme.active_terms
        if "attention" in self.terms_w and scheme.attention_target != "probs":
            raise ValueError("TextBrewer matches the attention maps HF returns (probabilities)")
        student = eager_copy(start.student).train()
        if cfg.dropout is not None:
            set_dropout(student, cfg.dropout)  # as the other rows' Stepper does
        self.teacher = start.teacher_eager.eval()
        self.layer_map = Distiller(student, self.teacher, scheme).layer_map
        self.matches = textbrewer_matches(
            scheme, self.layer_map, student.config.hidden_size, self.teacher.config.hidden_size
        )
        self.outdir = tempfile.mkdtemp(prefix="kd-bench-textbrewer-")  # it insists on one
        t_cfg = textbrewer.TrainingConfig(device=device, output_dir=self.outdir, log_dir=None)
        d_cfg = textbrewer.DistillationConfig(
            temperature=scheme.temperature,
            kd_loss_type="ce",
            kd_loss_weight=self.terms_w.get("logit", 0.0),
            hard_label_weight=0.0,
            intermediate_matches=copy.deepcopy(self.matches),
        )
        self.adaptor = _Adaptor(self.terms_w)
        self.d = textbrewer.GeneralDistiller(
            t_cfg, d_cfg, self.teacher, student, adaptor_T=self.adaptor, adaptor_S=self.adaptor
        )
        # The same initial projections as every other row.
        for m, p in zip(self.matches, self.d.projs, strict=True):
            if p is not None and start.projections is not None:
                key = "shared" if scheme.projection == "shared" else str(m["layer_S"])
                p.load_state_dict({k.split(".", 2)[-1]: v for k, v in start.projections.items()
                                   if k.split(".")[1] == key})
        self.args = {
            "output_hidden_states": "embedding" in self.terms_w or "hidden" in self.terms_w,
            "output_attentions": "attention" in self.terms_w,
        }
        opt = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr)
        self.opt, _, _ = self.d.initialize_training(opt, None, None, None)
        self.max_grad_norm = cfg.max_grad_norm
        self.i = 0
        self.config = {"distillation": {"temperature": scheme.temperature, "kd_loss_type": "ce",
                                        "kd_loss_weight": self.terms_w.get("logit", 0.0),
                                        "hard_label_weight": 0.0,
                                        "intermediate_matches": self.matches},
                       "model_kwargs": self.args}

    def _inputs(self, batch):
        self.adaptor.where = logit_positions(batch, self.scheme.logit_positions)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def terms(self, batch: dict[str, Tensor]) -> dict[str, float]:
        student = self.d.model_S
        student.eval()
        try:
            with torch.no_grad():
                _, parts = self.d.train_on_batch(self._inputs(batch), self.args)
                out: dict[str, float] = {}
                for m in self.matches:
                    key = f"unweighted_{m['feature']}_{m['loss']}_{m['layer_S']}_{m['layer_T']}"
                    out[_term_of(m)] = out.get(_term_of(m), 0.0) + float(parts[key])
                if "logit" in self.terms_w:
                    t = self.scheme.temperature
                    z = self.teacher(**self._inputs(batch)).logits[self.adaptor.where].float() / t
                    entropy = float(-(z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean())
                    out["logit"] = t * t * (float(parts["unweighted_kd_loss"]) - entropy)
                return out
        finally:
            student.train()

    def step(self, batch: dict[str, Tensor]) -> None:
        loss, parts = self.d.train_on_batch(self._inputs(batch), self.args)
        self.d.write_loss(loss, self.i, parts)
        self.i += 1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.d.model_S.parameters(), self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad()

    def close(self) -> None:
        shutil.rmtree(self.outdir, ignore_errors=True)


# ----------------------------------------------------------------------------- timing


def time_steps(step, batches, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each timed step, after ``warmup`` untimed ones; batches are cycled."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    times = []
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        t0 = time.perf_counter()
        step(b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def row_flops(start: Start, scheme: Scheme, shape: Shape, row: str, batches) -> dict[str, int]:
    """Model FLOPs of one step of ``row`` (kd/training/flops.py), heads at the positions it
    computes."""
    count = flops.StepFlops(Distiller(start.student, start.teacher, scheme), start.teacher.config)
    project = row.startswith("project")
    if count.where is None:
        positions = None
    elif project:
        # Mean over the batches the row sees: the masked count varies with the draw.
        positions = round(statistics.fmean(count.positions(b) for b in batches))
    else:
        positions = shape.batch_size * shape.seq_len  # the naive way runs the head everywhere
    return count.parts(shape.batch_size, shape.seq_len, positions, recomputed_scores=project)


def summarise(times: list[float], shape: Shape, fl: dict, peak_gflops: float, mem: PeakRSS):
    med = statistics.median(times)
    achieved = fl["total"] / med / 1e9
    return {
        "step_s": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "times_s": [round(t, 5) for t in times],
        "sequences_per_s": shape.batch_size / med,
        "tokens_per_s": shape.batch_size * shape.seq_len / med,
        "peak_rss_mib": mem.peak_mib,
        "rss_added_mib": mem.added_mib,
        "flops_per_step": fl["total"],
        "flops": fl,
        "achieved_gflops": achieved,
        "mfu": achieved / peak_gflops,
    }


# ----------------------------------------------------------------------------- agreement


def agreement(
    terms: dict[str, dict[str, float]],
    precisions: dict[str, str],
    cfg: BenchConfig,
    reference: str = REFERENCE,
) -> dict[str, dict]:
    """Check every row's terms against ``reference``'s: |x − ref| ≤ atol + rtol·|ref| per term.

    Returns, per row: ``ok``, the tolerance used (fp32 tight, bf16 loose), the largest relative
    difference, and the terms that disagree (``missing`` if a row lacks a term).
    """
    ref = terms[reference]
    out = {}
    for row, values in terms.items():
        bf16 = precisions.get(row) == "bf16"
        rtol = cfg.bf16_rtol if bf16 else cfg.fp32_rtol
        atol = cfg.bf16_atol if bf16 else cfg.fp32_atol
        bad, worst = [], 0.0
        for k, r in ref.items():
            if k not in values:
                bad.append(f"{k} (missing)")
                continue
            diff = abs(values[k] - r)
            worst = max(worst, diff / max(abs(r), 1e-12))
            if not diff <= atol + rtol * abs(r):  # `not <=` also catches nan
                bad.append(k)
        bad += [f"{k} (extra)" for k in values if k not in ref]
        out[row] = {"ok": not bad, "rtol": rtol, "atol": atol, "max_rel_diff": worst,
                    "disagree": bad}
    return out


# ----------------------------------------------------------------------------- the benchmark


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _arm(start, scheme, shape, cfg, device, peaks, log) -> dict:
    batches = make_batches(start.student.config.vocab_size, shape, cfg.n_batches, cfg.seed)
    builders: dict[str, Callable] = {
        "naive": lambda: naive_row(start, scheme, cfg, device, shape.batch_size),
        "textbrewer": lambda: TextBrewerStep(start, scheme, cfg, device),
        "project_fp32": lambda: project_row(start, scheme, "fp32", cfg, device, shape.batch_size),
        "project_bf16": lambda: project_row(start, scheme, "bf16", cfg, device, shape.batch_size),
        "project_bf16_sdpa": lambda: project_row(
            start, scheme, "bf16", cfg, device, shape.batch_size, attention="sdpa"
        ),
    }
    precisions = {"naive": "fp32", "textbrewer": "fp32", "project_fp32": "fp32",
                  "project_bf16": "bf16", "project_bf16_sdpa": "bf16"}
    rows: dict[str, dict] = {}
    terms: dict[str, dict[str, float]] = {}
    for name, build in builders.items():
        row = {"precision": precisions[name]}
        rows[name] = row
        if name == "textbrewer" and not cfg.textbrewer:
            row.update(status="skipped", error="disabled (--no-textbrewer)")
            continue
        if name.startswith("project_bf16") and not bf16_supported(device):
            row.update(status="skipped", error=f"bf16 is not faster than fp32 on {device}")
            continue
        if name == "project_bf16_sdpa" and attention_implementation(cfg.attention, device) == "sdpa":
            row.update(status="skipped", error="project_bf16 already runs the SDPA kernel")
            continue
        runner = None
        try:
            torch.manual_seed(cfg.seed)  # dropout masks: the same draws for a rerun of a row
            with PeakRSS() as mem:
                runner = build()
                if name == "textbrewer":
                    row["version"] = runner.version
                    row["config"] = runner.config
                # Stepper.terms runs the forward on the batch as given (step() moves it)
                terms[name] = runner.terms({k: v.to(device) for k, v in batches[0].items()})
                times = time_steps(runner.step, batches, cfg.warmup, cfg.steps, device)
            fl = row_flops(start, scheme, shape, name, batches)
            row.update(status="ok", memory_method=mem.method, terms=terms[name],
                       **summarise(times, shape, fl, peaks[precisions[name]], mem))
        except Exception as e:  # a row that cannot run is a result, not a crash
            row.update(status="failed", error=_error(e),
                       traceback=traceback.format_exc(limit=-4).splitlines()[-6:])
            log(f"  {name}: FAILED: {_error(e)}")
        finally:
            if isinstance(runner, TextBrewerStep):
                runner.close()
            del runner
    reference = REFERENCE if REFERENCE in terms else next(iter(terms), None)
    if reference is not None:
        for name, a in agreement(terms, precisions, cfg, reference).items():
            rows[name]["agreement"] = {"reference": reference, **a}
    base = rows.get("naive", {}).get("step_s")
    for row in rows.values():
        if base and row.get("step_s"):
            row["speedup_vs_naive"] = base / row["step_s"]
    return {"terms": sorted(scheme.active_terms), "rows": rows}


def scaling(start_by_arm, schemes, cfg, device, peaks, max_len, log) -> list[dict]:
    """tokens/s and peak memory of the project step at each (arm, batch size, sequence length)."""
    out = []
    for arm, scheme in schemes.items():
        start = start_by_arm[arm]
        for bs in cfg.sweep_batch:
            for seq in cfg.sweep_seq:
                entry = {"arm": arm, "batch_size": bs, "seq_len": seq, "precision": cfg.precision}
                out.append(entry)
                if seq > max_len:
                    entry.update(status="skipped", error=f"longer than the models' {max_len}")
                    continue
                shape = Shape(bs, seq)
                batches = make_batches(start.student.config.vocab_size, shape, cfg.n_batches,
                                       cfg.seed)
                try:
                    torch.manual_seed(cfg.seed)
                    with PeakRSS() as mem:
                        runner = project_row(start, scheme, cfg.precision, cfg, device, shape.batch_size)
                        times = time_steps(runner.step, batches, cfg.sweep_warmup,
                                           cfg.sweep_steps, device)
                    del runner
                    fl = row_flops(start, scheme, shape, "project", batches)
                    s = summarise(times, shape, fl, peaks[cfg.precision], mem)
                    entry.update(status="ok", **{k: s[k] for k in (
                        "step_s", "sequences_per_s", "tokens_per_s", "peak_rss_mib",
                        "rss_added_mib", "flops_per_step", "achieved_gflops", "mfu")})
                    log(f"  sweep {arm:<6} batch {bs:>3} seq {seq:>4}: "
                        f"{s['tokens_per_s']:8.0f} tok/s  {mem.peak_mib:7.0f} MiB peak")
                except Exception as e:
                    entry.update(status="failed", error=_error(e))
                    log(f"  sweep {arm} batch {bs} seq {seq}: FAILED: {_error(e)}")
    return out


def plot_scaling(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(e["arm"], e["batch_size"]) for e in entries})
    for arm, bs in series:
        pts = [e for e in entries if (e["arm"], e["batch_size"]) == (arm, bs)
               and e.get("status") == "ok"]
        if not pts:
            continue
        xs = [e["seq_len"] for e in pts]
        style = "-o" if arm == "multi" else "--s"
        ax1.plot(xs, [e["tokens_per_s"] for e in pts], style, label=f"{arm}, batch {bs}")
        ax2.plot(xs, [e["peak_rss_mib"] for e in pts], style, label=f"{arm}, batch {bs}")
    for ax, ylabel in ((ax1, "tokens / s"), (ax2, "peak resident memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    prec = entries[0]["precision"] if entries else ""
    fig.suptitle(f"Distillation step cost vs sequence length (project step, {prec})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _model_info(model: nn.Module) -> dict:
    return {**flops.describe(flops.Encoder.from_config(model.config)),
            "params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": model.config._attn_implementation}


def run_benchmark(
    teacher: nn.Module,
    student: nn.Module,
    shape: Shape,
    schemes: dict[str, Scheme],
    cfg: BenchConfig = BenchConfig(),
    *,
    device: torch.device | str = "cpu",
    out: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Benchmark every arm in ``schemes`` on these models and shapes; write JSON (+ PNG) to ``out``.

    ``teacher`` and ``student`` are BERT masked LMs (float32); neither is modified: every row
    trains its own copy of the student from the same weights.
    """
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    student = student.to(device)
    peaks = {"fp32": matmul_peak(cfg.matmul_n, torch.float32, cfg.matmul_repeats, device)}
    peaks["bf16"] = (matmul_peak(cfg.matmul_n, torch.bfloat16, cfg.matmul_repeats, device)
                     if bf16_supported(device) else float("nan"))
    log(f"matmul peak ({cfg.matmul_n}³, {torch.get_num_threads()} threads): "
        f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    teacher_eager = eager_copy(teacher).eval()
    starts, arms = {}, {}
    for arm, scheme in schemes.items():
        torch.manual_seed(cfg.seed)
        d = Distiller(student, teacher, scheme)
        proj = ({k: v.detach().clone() for k, v in d.projections.state_dict().items()}
                if d.projections is not None else None)
        starts[arm] = Start(teacher, teacher_eager, student, proj)
        log(f"arm {arm}: {', '.join(scheme.active_terms)} "
            f"(batch {shape.batch_size} × {shape.seq_len})")
        arms[arm] = _arm(starts[arm], scheme, shape, cfg, device, peaks, log)
    max_len = min(teacher.config.max_position_embeddings, student.config.max_position_embeddings)
    sweep = scaling(starts, schemes, cfg, device, peaks, max_len, log) if cfg.sweep else []
    tb = next((a["rows"]["textbrewer"] for a in arms.values()), {})
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "bf16_supported": bf16_supported(device),
        },
        "config": {**asdict(cfg), "shape": asdict(shape)},
        "models": {"teacher": _model_info(teacher), "student": _model_info(student)},
        # the kernel the project rows train the student with (base.attention on this device)
        "student_attention": attention_implementation(cfg.attention, device),
        "peak_gflops": {**peaks, "matmul_n": cfg.matmul_n},
        "textbrewer": {k: tb.get(k) for k in ("status", "version", "error")},
        "arms": arms,
        "agreement_ok": all(r.get("agreement", {}).get("ok", True)
                            for a in arms.values() for r in a["rows"].values()),
        "scaling": sweep,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if sweep:
            png = out.with_suffix(".png")
            plot_scaling(sweep, png)
            result["scaling_plot"] = png.name
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


# ----------------------------------------------------------------------------- report


def format_table(result: dict) -> str:
    lines = []
    head = (f"{'arm':<6} {'row':<17} {'prec':<4} {'step ms':>8} {'seq/s':>7} {'tok/s':>8} "
            f"{'×naive':>6} {'GFLOP':>7} {'GFLOP/s':>8} {'MFU':>6} {'peakMiB':>8} {'agree':>5}")
    lines += [head, "-" * len(head)]
    for arm, a in result["arms"].items():
        for name, r in a["rows"].items():
            if r.get("status") != "ok":
                lines.append(f"{arm:<6} {name:<17} {r['precision']:<4} "
                             f"{r.get('status', '?')}: {r.get('error', '')[:90]}")
                continue
            ag = r.get("agreement", {})
            lines.append(
                f"{arm:<6} {name:<17} {r['precision']:<4} {r['step_s'] * 1e3:8.1f} "
                f"{r['sequences_per_s']:7.2f} {r['tokens_per_s']:8.0f} "
                f"{r.get('speedup_vs_naive', float('nan')):6.2f} "
                f"{r['flops_per_step'] / 1e9:7.1f} {r['achieved_gflops']:8.1f} "
                f"{r['mfu']:6.1%} {r['peak_rss_mib']:8.0f} {'yes' if ag.get('ok') else 'NO':>5}"
            )
    lines.append("")
    lines.append("loss terms on the same batch and weights (dropout off):")
    for arm, a in result["arms"].items():
        for name, r in a["rows"].items():
            if "terms" in r:
                vals = "  ".join(f"{k}={v:.6g}" for k, v in r["terms"].items())
                ag = r.get("agreement", {})
                flag = "" if ag.get("ok", True) else f"   <-- DISAGREES: {ag['disagree']}"
                lines.append(f"  {arm:<6} {name:<17} {vals}  "
                             f"(max rel diff {ag.get('max_rel_diff', 0):.1e}){flag}")
    return "\n".join(lines)


def profile_steps(
    teacher, student, shape: Shape, scheme: Scheme, cfg: BenchConfig, *,
    device: torch.device | str = "cpu", steps: int = 3, rows: int = 25,
) -> str:
    """torch.profiler over ``steps`` project steps (after one warm-up); the top ops by self CPU."""
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    student = student.to(device)
    torch.manual_seed(cfg.seed)
    d = Distiller(student, teacher, scheme)
    proj = d.projections.state_dict() if d.projections is not None else None
    start = Start(teacher, teacher, student, proj)
    runner = project_row(start, scheme, cfg.precision, cfg, device, shape.batch_size)
    batches = make_batches(student.config.vocab_size, shape, max(steps, 1) + 1, cfg.seed)
    runner.step(batches[-1])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for b in batches[:steps]:
            runner.step(b)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ----------------------------------------------------------------------------- CLI


def load_models(params, max_seq_length: int):
    """The pipeline's teacher (``paths.teacher`` once prepared, else ``teacher.source``) and a
    freshly built student (``student.*``), both float32."""
    from kd.models.student import build
    from kd.models.teacher import load_teacher

    source = str(params.paths.teacher) if params.paths.teacher.exists() else params.teacher.source
    teacher, has_head = load_teacher(source)
    if not has_head:
        print(f"note: teacher '{source}' has no MLM head: a random tied one is used (fine for "
              "timing)", file=sys.stderr)
    student = build(params.student, vocab_size=teacher.config.vocab_size,
                    max_seq_length=max_seq_length, seed=params.base.seed)
    return teacher, student, source


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kd.bench", description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--out", default="data/bench/bench.json",
                   help="JSON to write; the scaling plot goes next to it as .png")
    p.add_argument("--steps", type=int, help="timed steps per row (default 10; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps per row (default 3; quick 1)")
    p.add_argument("--batch-size", type=int, help="default: train.batch_size (quick 4)")
    p.add_argument("--seq-len", type=int, help="default: tokenize.max_seq_length (quick 32)")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="precision of the sweep and the profile (default: base.precision)")
    p.add_argument("--threads", type=int, help="torch threads (default: base.threads, or all)")
    p.add_argument("--arms", nargs="+", help="arms to run (default: loss.arms)")
    p.add_argument("--quick", action="store_true", help="tiny step counts and shapes")
    p.add_argument("--no-sweep", action="store_true", help="skip the sequence-length sweep")
    p.add_argument("--no-textbrewer", action="store_true", help="skip the TextBrewer row")
    p.add_argument("--profile", action="store_true",
                   help="only profile a few steps of the multi arm and print the top ops")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=25)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from kd.core.params import load_params

    args = parse_args(argv)
    params = load_params(args.params)
    threads = args.threads if args.threads is not None else params.base.threads
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()  # as every stage does (kd.core.runtime.setup): time the step that trains
    device = torch.device("cuda" if params.base.device != "cpu" and torch.cuda.is_available()
                          else "cpu")
    cfg = BenchConfig(seed=params.base.seed, precision=args.precision or params.base.precision,
                      attention=params.base.attention, dropout=params.train.dropout,
                      lr=params.train.lr, weight_decay=params.train.weight_decay,
                      max_grad_norm=params.train.max_grad_norm)
    shape = Shape(params.train.batch_size, params.tokenize.max_seq_length,
                  params.tokenize.mlm_probability)
    if args.quick:
        cfg = replace(cfg, **QUICK)
        shape = replace(QUICK_SHAPE, mlm_probability=shape.mlm_probability)
    cfg = replace(
        cfg,
        steps=args.steps or cfg.steps,
        warmup=args.warmup if args.warmup is not None else cfg.warmup,
        sweep=not args.no_sweep,
        textbrewer=not args.no_textbrewer,
    )
    shape = replace(shape, batch_size=args.batch_size or shape.batch_size,
                    seq_len=args.seq_len or shape.seq_len)
    arms = args.arms or list(params.loss.arms)
    unknown = [a for a in arms if a not in params.loss.schemes]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}: choose from {sorted(params.loss.schemes)}")
    schemes = {a: params.loss.schemes[a] for a in arms}
    max_len = max([shape.seq_len, *cfg.sweep_seq])
    teacher, student, source = load_models(params, max_len)

    if args.profile:
        arm = "multi" if "multi" in params.loss.schemes else arms[0]
        print(f"profiling {args.profile_steps} steps of arm '{arm}' ({cfg.precision}, batch "
              f"{shape.batch_size} × {shape.seq_len}, {torch.get_num_threads()} threads)")
        print(profile_steps(teacher, student, shape, params.loss.schemes[arm], cfg,
                            device=device, steps=args.profile_steps, rows=args.profile_rows))
        return 0

    result = run_benchmark(teacher, student, shape, schemes, cfg, device=device, out=args.out)
    result["models"]["teacher"]["source"] = source
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print()
    print(format_table(result))
    tb = result["textbrewer"]
    if tb.get("status") == "failed":
        print(f"\nTextBrewer could not run: {tb['error']}")
    print(f"\nwrote {args.out}" + (f" and {result['scaling_plot']}" if "scaling_plot" in result
                                   else ""))
    if not result["agreement_ok"]:
        print("the rows' loss terms DISAGREE (see the table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
