"""quantize: dynamic int8 quantization of the distilled student, scored and timed against fp32."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from kd.core import cli, runtime, tracking
from kd.core.io import atomic_dir, need, write_json
from kd.core.params import load_params
from kd.data import tokens
from kd.quantize import dynamic as quantize


def _numbers(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def main() -> None:
    p = load_params()
    # Quantized kernels are CPU-only, so base.device is not read; nothing draws at random.
    runtime.configure(p.base.threads)
    rt = runtime.record(torch.device("cpu"), "fp32")
    cfg, out_dir = p.quantize, p.paths.quantize
    need(p.paths.distilled / "config.json", "report")
    test = tokens.load(p.paths.tokens)["test"]
    teacher = AutoModelForMaskedLM.from_pretrained(p.paths.teacher)
    student = AutoModelForMaskedLM.from_pretrained(p.paths.distilled)

    with tracking.start_run(
        "quantize", params={"quantize": cfg.model_dump()}, runtime=rt
    ) as run:
        with atomic_dir(out_dir) as tmp:
            probe_with = None
            if cfg.probe:
                probe_with = (AutoTokenizer.from_pretrained(p.paths.distilled), p.probe)
            result = quantize.run(teacher, student, test, cfg, tmp, probe_with)
            (tmp / "quantize.md").write_text(quantize.markdown(result.metrics, cfg))
        metrics = result.metrics
        write_json(p.paths.metrics / "quantize.json", {**metrics, "runtime": rt})
        run.log_metrics(_numbers(metrics))
        run.log_metrics(_numbers(result.latency))
        run.log_artifact(out_dir / "quantize.md", "quantize")
        latency = quantize.latency_markdown(result.latency, cfg, torch.get_num_threads())
        run.log_text(latency, "quantize/latency.md")
    q = quantize.QUANT
    probed = ""
    if cfg.probe:
        probed = (
            f", linear probe {metrics['fp32/probe_linear_acc']:.3f} -> "
            f"{metrics[f'{q}/probe_linear_acc']:.3f}"
        )
    print(
        f"{cfg.dtype}: size {metrics['size_ratio']:.0%} of fp32, logit KL "
        f"{metrics['fp32/logit_kl_t1']:.4f} -> {metrics[f'{q}/logit_kl_t1']:.4f}, top-1 "
        f"{metrics['fp32/mlm_top1']:.3f} -> {metrics[f'{q}/mlm_top1']:.3f}{probed}; "
        f"report in {out_dir / 'quantize.md'}\n{latency}"
    )


if __name__ == "__main__":
    cli.run(main)
