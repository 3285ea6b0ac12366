"""probe: what each model is good for downstream, on one labelled text set (kd/probe.py).

Scores the teacher, the initial student (the floor) and every trained scheme with a linear probe
on frozen features and a short fine-tune, on one fixed split; writes ``metrics/probe.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from kd import arms, probe, tracking
from kd.io import write_json
from kd.params import Params, load_params
from kd.runtime import setup

FINETUNE_LOG_EVERY = 10  # steps between fine-tune loss points in MLflow (one round trip each)


def models(p: Params) -> list[tuple[str, Path, str]]:
    """(name, directory, the stage that writes it) for every model the probe scores."""
    return [
        ("teacher", p.paths.teacher, "prepare_teacher"),
        (arms.FLOOR, arms.of_floor(p).student, "init_student"),
        *((o.name, o.student, o.train_stage) for o in arms.compared(p)),
    ]


def main() -> None:
    p = load_params()
    device, _ = setup(p.base, seed=p.probe.seed)
    todo = models(p)
    for _, model_dir, stage in todo:
        if not model_dir.exists():
            raise SystemExit(f"{model_dir} is missing: run {stage} first (`dvc repro`)")
    start = time.perf_counter()
    data = probe.load(p.probe)
    train_rows, test_rows = probe.split(data.labels, p.probe.test_fraction, p.probe.seed)
    counts = [int((data.labels[test_rows] == c).sum()) for c in range(len(data.classes))]
    summary: dict = {
        "dataset": p.probe.source,
        "classes": ",".join(data.classes),
        "n_classes": len(data.classes),
        "n_train": len(train_rows),
        "n_test": len(test_rows),
        "majority_acc": max(counts) / len(test_rows),  # the accuracy of always guessing one class
    }
    print(
        f"probe: {p.probe.source}, {len(data.classes)} classes, {len(train_rows)} train / "
        f"{len(test_rows)} test texts, on {device}"
    )

    with tracking.start_run("probe", params={"probe": p.probe.model_dump(mode="json")}) as run:
        for name, model_dir, _ in todo:
            t = time.perf_counter()
            result, losses = probe.probe_model(
                model_dir, data, train_rows, test_rows, p.probe, device, p.base.precision
            )
            seconds = time.perf_counter() - t
            summary.update({f"{name}/{k}": v for k, v in result.items()})
            summary[f"{name}/seconds"] = seconds
            for step, loss in enumerate(losses, 1):
                if step % FINETUNE_LOG_EVERY == 0 or step == len(losses):
                    run.log_metrics({f"{name}/finetune_loss": loss}, step=step)
            ft = result["finetune_acc"]
            print(
                f"  {name}: linear probe {result['linear_acc']:.3f}, fine-tune "
                f"{'–' if ft is None else f'{ft:.3f}'} ({seconds:.0f} s)"
            )
        summary["seconds"] = time.perf_counter() - start
        write_json(p.paths.metrics / "probe.json", summary)
        run.log_metrics(
            {k: v for k, v in summary.items() if isinstance(v, int | float)}
        )


if __name__ == "__main__":
    main()
