"""probe@<arm>, probe_teacher, probe_init: what one model is good for downstream.

A linear probe on frozen features and a short fine-tune on one labelled text set and one fixed
split (kd/probe/probe.py). One stage per model, so an experiment reprobes only the models it changed:
another seed reprobes the students, a new scheme only its own, and the teacher never.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kd.core import arms, cli, runtime, tracking
from kd.core.io import need, write_json
from kd.core.params import Params, load_params
from kd.probe import probe

FINETUNE_LOG_EVERY = 10  # steps between fine-tune loss points in MLflow (one round trip each)


def run_stage(p: Params, name: str, model_dir: Path, stage: str, out: Path) -> None:
    """Probe ``model_dir`` (written by ``stage``) and write its accuracies to ``out``."""
    need(model_dir, stage)
    device, _ = runtime.setup(p.base, seed=p.probe.seed)
    start = time.perf_counter()
    rt = runtime.record(device, p.base.precision,
                        runtime.attention_implementation(p.base.attention, device))
    data, train_rows, test_rows = probe.load_split(p.probe)
    counts = [int((data.labels[test_rows] == c).sum()) for c in range(len(data.classes))]
    print(
        f"probe {name}: {p.probe.source}, {len(data.classes)} classes, {len(train_rows)} train / "
        f"{len(test_rows)} test texts, on {device}"
    )
    with tracking.start_run(
        "probe", params={"probe": p.probe.model_dump(mode="json")}, arm=name, runtime=rt
    ) as run:
        result, losses = probe.probe_model(
            model_dir, data, train_rows, test_rows, p.probe, device, p.base.precision,
            p.base.attention,
        )
        summary = {
            **result,
            "dataset": p.probe.source,
            "classes": ",".join(data.classes),
            "n_classes": len(data.classes),
            "n_train": len(train_rows),
            "n_test": len(test_rows),
            # The accuracy of always answering the commonest class: the floor of any probe.
            "majority_acc": max(counts) / len(test_rows),
            "runtime": rt,
        }
        write_json(out, summary)
        seconds = time.perf_counter() - start  # MLflow and the console only
        for step, loss in enumerate(losses, 1):
            if step % FINETUNE_LOG_EVERY == 0 or step == len(losses):
                run.log_metrics({"finetune_loss": loss}, step=step)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        run.log_metrics({"time/seconds": seconds})
    ft = result["finetune_acc"]
    print(
        f"  {name}: linear probe {result['linear_acc']:.3f}, fine-tune "
        f"{'–' if ft is None else f'{ft:.3f}'} ({seconds:.0f} s)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--teacher", action="store_true", help="probe the prepared teacher")
    who.add_argument("--init", action="store_true", help="probe the initial student (the floor)")
    who.add_argument("--arm", help="a scheme name listed in loss.arms")
    args = ap.parse_args(argv)
    p = load_params()
    if args.teacher:
        run_stage(p, arms.TEACHER, p.paths.teacher, "prepare_teacher", arms.teacher_probe_json(p))
        return
    if args.init:
        floor = arms.of_floor(p)
        run_stage(p, floor.name, floor.student, "init_student", floor.probe_json)
        return
    out = arms.arm(p, args.arm)
    run_stage(p, out.name, out.student, out.train_stage, out.probe_json)


if __name__ == "__main__":
    cli.run(main)
