"""Distil, then quantize: dynamic int8 quantization of the distilled student, judged against fp32.

Dynamic quantization stores every ``nn.Linear`` weight as int8 (per-tensor affine) and quantizes
each activation on the fly from its observed range, so it needs no calibration data; embeddings
and LayerNorm stay fp32. Its kernels (fbgemm / x86 / qnnpack) are CPU-only, so everything here
runs on the CPU whatever ``base.device`` says. BERT ties the masked-LM decoder to the word
embeddings: quantizing the decoder gives it its own int8 copy while the fp32 embedding table
stays, which is why the checkpoint shrinks far less than the encoder's Linear layers do.

``torch.ao.quantization.quantize_dynamic`` is deprecated (torch points to torchao's
``quantize_(model, Int8DynamicActivationInt8WeightConfig())``) but ships and works in torch 2.13;
torchao is not a dependency of this project, so the deprecation warning is silenced here, once.

Measured for the fp32 student and its quantized copy, on the same inputs:
  logit_kl_t1, agreement   KL(p_T ‖ p_S) at T = 1 and argmax agreement with the teacher, at the
                           masked positions of the first ``test_batches`` fixed test batches
  mlm_loss, mlm_top1, mlm_top5   against the true tokens at those positions
  size_bytes               the file ``torch.save(model.state_dict())`` writes, in bytes (the
                           quantized one is kept as ``student_<dtype>.pt``)
  latency_ms/b<n>          median wall time of one masked-LM forward of n sequences of
                           ``latency_seq_length`` tokens (whole blocks if null), after
                           ``warmup_batches`` untimed ones;
                           latency_ms_per_seq/b<n> divides it by n. Wall time: these go to
                           ``Result.latency`` (MLflow), never into the metrics DVC hashes
and for the quantized copy against fp32: kl_to_fp32 (KL(p_fp32 ‖ p_int8), T = 1) and
agreement_with_fp32, at the same positions. With ``quantize.probe`` on, also
  probe_linear_acc         kd.probe.probe's linear probe (its data, split and classifier) on each
                           model's frozen features, both computed here on the CPU in fp32, so the
                           two differ only by the int8 weights (the probe stage's own number ran
                           under ``base.precision`` and may differ from this fp32 one slightly)
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from torch import Tensor, nn

from kd.core.params import Probe, Quantize
from kd.data.masking import IGNORE
from kd.distill.distiller import mlm_head
from kd.evaluation.evaluate import fixed_batches, logit_metrics, summarize
from kd.probe import probe

DTYPES = {"qint8": torch.qint8}
FP32, QUANT = "fp32", "int8"
# Per-model columns of the scored batches kept in the metrics (see the module docstring).
_SCORES = ("logit_kl_t1", "agreement", "mlm_loss", "mlm_top1", "mlm_top5")


def quantize_dynamic(model: nn.Module, dtype: str = "qint8") -> nn.Module:
    """An eval-mode copy of ``model`` with every ``nn.Linear`` dynamically quantized."""
    from torch.ao.quantization import quantize_dynamic as _quantize

    with warnings.catch_warnings():
        # Deprecated in favour of torchao (see the module docstring), still the stock CPU path.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return _quantize(copy.deepcopy(model).eval(), {nn.Linear}, dtype=DTYPES[dtype])


def quantized_linears(model: nn.Module) -> int:
    """How many Linear layers of ``model`` run as dynamically quantized ones."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in model.modules())


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> int:
    """``torch.save(model.state_dict(), path)``; returns the file's size in bytes."""
    torch.save(model.state_dict(), path)
    return os.path.getsize(path)


def state_dict_bytes(model: nn.Module, name: str = "model") -> int:
    """What ``model``'s state_dict takes on disk (the archive's entries are named after the
    file, so ``name`` matters to the byte)."""
    with tempfile.TemporaryDirectory() as tmp:
        return save_state_dict(model, Path(tmp) / f"{name}.pt")


def _masked_logits(model: nn.Module, batch: dict[str, Tensor], where: Tensor) -> Tensor:
    # The 30k-word head only at the scored positions, as kd.distill.distiller does.
    last = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return mlm_head(model)(last[where]).float()


def score(
    teacher: nn.Module,
    models: dict[str, nn.Module],
    test: Dataset,
    batch_size: int,
    n_batches: int,
) -> list[dict]:
    """Per-batch rows (``split`` = model name, or ``<name>_vs_fp32``) on the fixed test batches.

    The teacher runs once per batch; each model sees exactly the teacher's masked positions.
    """
    rows: list[dict] = []
    with torch.inference_mode():
        for b, batch in enumerate(fixed_batches(test, batch_size, n_batches)):
            where = batch["labels"] != IGNORE
            labels = batch["labels"][where]
            t_logits = _masked_logits(teacher, batch, where)
            logits = {name: _masked_logits(m, batch, where) for name, m in models.items()}
            for name, s_logits in logits.items():
                row = logit_metrics(s_logits, t_logits, labels, 1.0)
                rows.append({"split": name, "batch": b, **row})
                if name != FP32 and FP32 in logits:
                    vs = logit_metrics(s_logits, logits[FP32], labels, 1.0)
                    rows.append({"split": f"{name}_vs_fp32", "batch": b, **vs})
    return rows


def latency_inputs(test: Dataset, batch_size: int, seq_length: int | None) -> dict[str, Tensor]:
    """``batch_size`` real test blocks cut to ``seq_length`` tokens (whole blocks for None;
    cycled if too few)."""
    if len(test) == 0:
        raise SystemExit("the test split is empty: there is nothing to time the models on")
    block = len(test[0]["input_ids"])
    seq_length = seq_length or block
    if seq_length > block:
        raise SystemExit(
            f"quantize.latency_seq_length={seq_length} is longer than the {block}-token blocks "
            f"the tokenize stage packed: set it to at most {block} (tokenize.max_seq_length)"
        )
    rows = test[[i % len(test) for i in range(batch_size)]]
    return {
        "input_ids": torch.as_tensor(rows["input_ids"], dtype=torch.long)[:, :seq_length],
        "attention_mask": torch.as_tensor(rows["attention_mask"], dtype=torch.long)[:, :seq_length],
    }


def latency_ms(model: nn.Module, inputs: dict[str, Tensor], warmup: int, repeats: int) -> float:
    """Median wall time, in ms, of one full masked-LM forward on ``inputs``."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(**inputs)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def probe_accuracy(models: dict[str, nn.Module], tokenizer, cfg: Probe) -> dict[str, float]:
    """``<name>/probe_linear_acc`` per model: kd.probe.probe's linear probe on its frozen features.

    The texts, split and classifier are the probe stage's (``cfg``); features run on the CPU in
    fp32 for every model, because the int8 kernels are CPU-only and fp32 is the like-for-like
    baseline. A quantized encoder cannot be fine-tuned, so the fine-tune is not repeated.
    """
    data, train_rows, test_rows = probe.load_split(cfg)
    ids = probe.tokenize(tokenizer, data.texts, cfg.max_seq_length)
    pad_id = probe.pad_token_id(tokenizer)
    return {
        f"{name}/probe_linear_acc": probe.linear_accuracy(
            model.base_model, ids, pad_id, data.labels, train_rows, test_rows, cfg,
            torch.device("cpu"),
        )
        for name, model in models.items()
    }


@dataclass
class Result:
    metrics: dict[str, float | int | str] = field(default_factory=dict)  # deterministic
    latency: dict[str, float] = field(default_factory=dict)  # wall time: MLflow only
    rows: list[dict] = field(default_factory=list)
    quantized: nn.Module | None = None


def model_file(cfg: Quantize) -> str:
    return f"student_{cfg.dtype}.pt"


def run(
    teacher: nn.Module,
    student: nn.Module,
    test: Dataset,
    cfg: Quantize,
    out_dir: Path,
    probe_with: tuple[object, Probe] | None = None,
) -> Result:
    """Quantize ``student``, save its state_dict in ``out_dir`` and measure both versions (see
    the module docstring); CPU only. ``probe_with`` = (the student's tokenizer, the probe's
    params) adds the linear probe's accuracy of both."""
    teacher, student = teacher.to("cpu").eval(), student.to("cpu").eval()
    quantized = quantize_dynamic(student, cfg.dtype)
    models = {FP32: student, QUANT: quantized}
    rows = score(teacher, models, test, cfg.batch_size, cfg.test_batches)
    summary = summarize(rows)
    out: dict[str, float | int | str] = {
        "dtype": cfg.dtype,
        "test_batches": summary[f"{FP32}/batches"],
        "positions": summary[f"{FP32}/positions"],
        "teacher_mlm_top1": summary[f"{FP32}/teacher_mlm_top1"],
        f"{QUANT}/linear_layers": quantized_linears(quantized),
        f"{QUANT}/kl_to_fp32": summary[f"{QUANT}_vs_fp32/logit_kl_t1"],
        f"{QUANT}/agreement_with_fp32": summary[f"{QUANT}_vs_fp32/agreement"],
    }
    for name in models:
        for key in _SCORES:
            out[f"{name}/{key}"] = summary[f"{name}/{key}"]
    out[f"{FP32}/size_bytes"] = state_dict_bytes(student, "student_fp32")
    out[f"{QUANT}/size_bytes"] = save_state_dict(quantized, Path(out_dir) / model_file(cfg))
    out["size_ratio"] = out[f"{QUANT}/size_bytes"] / out[f"{FP32}/size_bytes"]
    if probe_with is not None:
        out.update(probe_accuracy(models, *probe_with))
    latency: dict[str, float] = {}
    for n in cfg.latency_batch_sizes:
        inputs = latency_inputs(test, n, cfg.latency_seq_length)
        for name, model in models.items():
            ms = latency_ms(model, inputs, cfg.warmup_batches, cfg.latency_batches)
            latency[f"{name}/latency_ms/b{n}"] = ms
            latency[f"{name}/latency_ms_per_seq/b{n}"] = ms / n
        latency[f"speedup/b{n}"] = (
            latency[f"{FP32}/latency_ms/b{n}"] / latency[f"{QUANT}/latency_ms/b{n}"]
        )
    return Result(metrics=out, latency=latency, rows=rows, quantized=quantized)


def latency_markdown(lat: dict, cfg: Quantize, threads: int) -> str:
    """The timing half of the report (for MLflow: wall time never goes into an output DVC
    hashes)."""
    lines = [
        f"# Latency, fp32 vs {cfg.dtype}",
        "",
        f"On {threads} CPU thread(s): median of {cfg.latency_batches} forwards of "
        f"{f'{cfg.latency_seq_length}-token' if cfg.latency_seq_length else 'whole-block'} "
        f"sequences after {cfg.warmup_batches} warm-up ones.",
        "",
        f"| batch | fp32 (ms per sequence) | {cfg.dtype} (ms per sequence) | speed-up |",
        "|---|---|---|---|",
    ]
    for n in cfg.latency_batch_sizes:
        lines.append(
            f"| {n} | {lat[f'{FP32}/latency_ms_per_seq/b{n}']:.2f} | "
            f"{lat[f'{QUANT}/latency_ms_per_seq/b{n}']:.2f} | {lat[f'speedup/b{n}']:.2f}× |"
        )
    return "\n".join([*lines, ""])


def markdown(m: dict, cfg: Quantize) -> str:
    """A short report of one :func:`run`'s scores and sizes (its latency: MLflow)."""

    def row(label: str, key: str, fmt: str) -> str:
        return f"| {label} | {m[f'{FP32}/{key}']:{fmt}} | {m[f'{QUANT}/{key}']:{fmt}} |"

    lines = [
        "# Distil, then quantize",
        "",
        f"The distilled student with every Linear layer dynamically quantized to {cfg.dtype} "
        f"({m[f'{QUANT}/linear_layers']} layers), against the same student in fp32. Scores on "
        f"the {m['positions']} masked positions of the first {m['test_batches']} test batches "
        "(fixed masks). Latency is wall time, so it is logged to MLflow (the quantize run's "
        "`latency.md` and `latency_ms/...` metrics) rather than written here.",
        "",
        f"| | fp32 | {cfg.dtype} |",
        "|---|---|---|",
        row("logit KL vs teacher (T = 1)", "logit_kl_t1", ".4f"),
        row("agreement with teacher", "agreement", ".3f"),
        row("MLM top-1", "mlm_top1", ".3f"),
        row("MLM loss", "mlm_loss", ".4f"),
        # MB in the table; the JSON keeps bytes.
        f"| state_dict size (MB) | {m[f'{FP32}/size_bytes'] / 1e6:.1f} | "
        f"{m[f'{QUANT}/size_bytes'] / 1e6:.1f} |",
    ]
    if f"{QUANT}/probe_linear_acc" in m:
        lines.append(row("linear probe accuracy (CPU, fp32 features)", "probe_linear_acc", ".3f"))
    lines += [
        "",
        f"The quantized model is {m['size_ratio']:.0%} of the fp32 size. "
        f"Against the fp32 student it agrees on {m[f'{QUANT}/agreement_with_fp32']:.1%} of the "
        f"top-1 predictions (KL {m[f'{QUANT}/kl_to_fp32']:.4f}). The decoder is tied to the "
        "word embeddings in fp32; quantizing it adds an int8 copy while the fp32 table stays, so "
        "the size shrinks much less than the encoder's weights do.",
        "",
        f"`{model_file(cfg)}` is the quantized state_dict. To load it: build the student "
        "from `config.json` in the distilled model's folder, apply "
        "`kd.quantize.dynamic.quantize_dynamic` to it, then `load_state_dict(torch.load(path))`.",
        "",
    ]
    return "\n".join(lines)
