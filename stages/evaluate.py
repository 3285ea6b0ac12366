"""evaluate@<arm>: score one arm's student against the teacher on the fixed batches.

``--init`` scores the initial student instead (the floor both arms started from), at T = 1 on
masked positions with the uniform layer map; its outputs are named ``student_init``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForMaskedLM

from kd.core import arms, cli, runtime, tracking
from kd.core.io import atomic_file, need, write_json
from kd.core.params import load_params
from kd.data import tokens
from kd.distill.projections import Projections
from kd.evaluation.evaluate import Judge, evaluate, summarize


def load_projections(path: Path, d_student: int, d_teacher: int) -> Projections:
    """The arm's learned projections, with the indices its state dict holds."""
    state = torch.load(path, weights_only=True)
    keys = sorted({k.split(".")[1] for k in state}, key=lambda k: (not k.isdigit(), k.zfill(6)))
    shared = keys == ["shared"]
    proj = Projections(d_student, d_teacher, [] if shared else [int(k) for k in keys], shared)
    proj.load_state_dict(state)
    return proj


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--arm", help="a scheme name listed in loss.arms")
    who.add_argument("--init", action="store_true", help="score the initial student (the floor)")
    args = ap.parse_args(argv)
    p = load_params()
    if args.init:
        run_stage(p, arms.of_floor(p), None)
        return
    out = arms.arm(p, args.arm)
    run_stage(p, out, p.loss.schemes[out.name])


def run_stage(p, out: arms.Outputs, scheme) -> None:
    """Score ``out.student`` (trained with ``scheme``; None for the floor) into ``out``'s files."""
    # Nothing here draws a random number: no seed, so evaluate never depends on base.seed.
    runtime.configure(p.base.threads)
    device = runtime.pick_device(p.base)
    name, model_dir = out.name, out.student
    judge = Judge() if scheme is None else Judge.of(scheme)
    need(model_dir, out.train_stage)
    dd = tokens.load(p.paths.tokens)
    teacher = AutoModelForMaskedLM.from_pretrained(p.paths.teacher)
    student = AutoModelForMaskedLM.from_pretrained(model_dir)
    projections = None
    if scheme is not None and (model_dir / "projections.pt").exists():
        projections = load_projections(
            model_dir / "projections.pt", student.config.hidden_size, teacher.config.hidden_size
        )

    rt = runtime.record(device, p.base.precision, student.config._attn_implementation)
    with tracking.start_run(
        "evaluate",
        params={"evaluate": p.evaluate.model_dump(), "judge": vars(judge)},
        arm=name,
        runtime=rt,
    ) as run:
        for split in ("train", "test"):
            run.log_dataset(dd[split], f"tokens/{split}", p.paths.tokens / split, "evaluation")
        result = evaluate(
            teacher,
            student,
            dd["train"],
            dd["test"],
            p.evaluate,
            judge,
            projections=projections,
            device=device,
            precision=p.base.precision,
        )
        frame = pd.DataFrame(result.rows)
        with atomic_file(out.eval_csv) as f:
            frame.to_csv(f, index=False)
        # One file per split as well: `dvc plots` cannot filter rows, and overlays need them.
        for split, part in frame.groupby("split", sort=False):
            with atomic_file(out.eval_split_csv(split)) as f:
                part.dropna(axis=1, how="all").to_csv(f, index=False)
        summary = {
            **summarize(result.rows),
            "layer_map": result.layer_map,
            "lstsq/fit_tokens": result.fit_tokens,
            "train_temperature": judge.temperature,
            "logit_positions": "masked",
            "runtime": rt,
        }
        write_json(out.eval_json, summary)
        # Per-batch curves, one per split and metric, with the batch index as the step.
        for row in result.rows:
            run.log_metrics(
                {
                    f"{row['split']}/{k}": v
                    for k, v in row.items()
                    if k not in ("split", "batch") and math.isfinite(v)
                },
                step=row["batch"],
            )
        run.log_metrics(
            {
                f"mean/{k}": v
                for k, v in summary.items()
                if isinstance(v, float | int) and math.isfinite(v)
            }
        )
        run.log_artifact(out.eval_csv)
    print(
        f"{name}: test logit KL (T=1) {summary['test/logit_kl_t1']:.4f}, "
        f"masked top-1 {summary['test/mlm_top1']:.3f}, agreement {summary['test/agreement']:.3f}"
    )


if __name__ == "__main__":
    cli.run(main)
