"""quantize: dynamic int8 quantization of the distilled student, scored and timed against fp32."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from kd.core import tracking
from kd.core.io import atomic_dir, write_json
from kd.core.params import load_params
from kd.core.runtime import setup
from kd.data import tokens
from kd.quantize import dynamic as quantize


def main() -> None:
    p = load_params()
    setup(p.base)  # threads and seed; quantized kernels are CPU-only, so the device is ignored
    cfg, out_dir = p.quantize, p.paths.quantize
    if not (p.paths.distilled / "config.json").exists():
        raise SystemExit(f"{p.paths.distilled} holds no model: run the report stage first")
    test = tokens.load(p.paths.tokens)["test"]
    teacher = AutoModelForMaskedLM.from_pretrained(p.paths.teacher)
    student = AutoModelForMaskedLM.from_pretrained(p.paths.distilled)

    with tracking.start_run(
        "quantize", params={"quantize": cfg.model_dump(), "loss.scheme": p.loss.scheme}
    ) as run:
        with atomic_dir(out_dir) as tmp:
            probe_with = None
            if cfg.probe:
                probe_with = (AutoTokenizer.from_pretrained(p.paths.distilled), p.probe)
            metrics = quantize.run(teacher, student, test, cfg, tmp, probe_with).metrics
            (tmp / "quantize.md").write_text(
                quantize.markdown(metrics, cfg, torch.get_num_threads())
            )
        write_json(p.paths.metrics / "quantize.json", metrics)
        run.log_metrics(
            {
                k: float(v)
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
        )
        run.log_artifact(out_dir / "quantize.md", "quantize")
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
        f"report in {out_dir / 'quantize.md'}"
    )


if __name__ == "__main__":
    main()
