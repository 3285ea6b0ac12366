"""train@<arm>: distil the teacher into the initial student with the arm's scheme."""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from kd.core import arms, cli, runtime, tracking
from kd.core import dist as kdist
from kd.core.io import atomic_dir, atomic_file, dir_digest, need, read_json, write_json
from kd.core.params import load_params
from kd.data import tokens
from kd.distill.distiller import Distiller
from kd.models import student
from kd.training import checkpoint
from kd.training.loop import Masking, train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--arm", help="a scheme name listed in loss.arms")
    who.add_argument("--scheme", action="store_true",
                     help="loss.scheme, when it is not an arm (the train_scheme stage)")
    args = ap.parse_args(argv)
    p = load_params()
    with arms.writing(p, args.arm, "train") as out:
        if out is not None:
            run_stage(p, out)


def resume_fingerprint(p, arm: str, masking: Masking, init_hash: str) -> str:
    """Everything the next step depends on: a checkpoint written under another value of any of
    these is ignored (kd/training/checkpoint.py), never continued. The teacher's and the train
    tokens' folders by content (every weight shard, every Arrow file), the masking by its mask
    rate and token, the scheme, the train and base sections, and the initial student."""
    return checkpoint.fingerprint(
        arm,
        p.loss.schemes[arm].model_dump(),
        p.train.model_dump(),
        p.base.model_dump(),
        masking,
        init_hash,
        dir_digest(p.paths.teacher),
        dir_digest(p.paths.tokens / "train"),
    )


def run_stage(p, out: arms.Outputs) -> None:
    arm = out.name
    scheme = p.loss.schemes[arm]
    device, _ = runtime.setup(p.base)
    dist, device = kdist.init(device)

    ds = tokens.load(p.paths.tokens)["train"]
    need(p.paths.teacher, "prepare_teacher")
    need(p.paths.student_init, "init_student")
    tok = AutoTokenizer.from_pretrained(p.paths.teacher)
    teacher = AutoModelForMaskedLM.from_pretrained(p.paths.teacher)
    init = AutoModelForMaskedLM.from_pretrained(p.paths.student_init)
    init_hash = student.weights_hash(init)
    expected = read_json(p.paths.metrics / "student_init.json")["weights_sha256"]
    if init_hash != expected:
        raise SystemExit(
            f"{p.paths.student_init} does not hold the weights init_student recorded "
            f"({init_hash[:12]} != {expected[:12]}): rebuild it with `dvc repro -f init_student`"
        )
    distiller = Distiller(init, teacher, scheme)
    masking = Masking(p.train.masking, tok.mask_token_id, len(tok), p.tokenize.mlm_probability)
    rt = runtime.record(device, p.base.precision,
                        runtime.attention_implementation(p.base.attention, device))

    ckpt_dir = p.paths.checkpoints / arm
    fingerprint = resume_fingerprint(p, arm, masking, init_hash)
    resume = checkpoint.load(ckpt_dir, fingerprint)
    run_params = {"scheme": scheme.model_dump(), "train": p.train.model_dump(), "seed": p.base.seed}
    with tracking.start_run(
        "train",
        params=None if resume else run_params,
        arm=arm,
        tags={"kd.scheme_terms": ",".join(scheme.active_terms), "kd.student_init_sha256": init_hash},
        run_id=resume.get("mlflow_run_id") if resume else None,
        enabled=dist.main,  # rank 0 alone logs and writes
        runtime=rt,
        system_metrics=True,
    ) as run:
        run.log_dataset(ds, "tokens/train", p.paths.tokens / "train", "training")
        result = train(
            distiller,
            teacher,
            ds,
            p.train,
            seed=p.base.seed,
            precision=p.base.precision,
            attention=p.base.attention,
            device=device,
            masking=masking,
            run=run,
            ckpt_dir=ckpt_dir,
            fingerprint=fingerprint,
            resume=resume,
            dist=dist,
        )
        if not dist.main:
            kdist.shutdown(dist)
            return
        summary = {**result.summary, "layer_map": distiller.layer_map, "runtime": rt}
        with atomic_dir(out.student) as tmp:
            distiller.student.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if distiller.projections is not None:
                torch.save(distiller.projections.state_dict(), tmp / "projections.pt")
            write_json(
                tmp / "kd_config.json",
                {
                    "arm": arm,
                    "scheme": scheme.model_dump(),
                    "layer_map": distiller.layer_map,
                    "train": p.train.model_dump(),
                    "seed": p.base.seed,
                    "student_init_sha256": init_hash,
                    "runtime": rt,
                },
            )
        with atomic_file(out.train_csv) as f:
            pd.DataFrame(result.rows).to_csv(f, index=False)
        write_json(out.train_json, summary)
        # Prefixed: "tokens" is also a per-step curve, which a step-less point would join.
        run.log_metrics(
            {f"summary/{k}": v for k, v in result.summary.items() if isinstance(v, float | int)},
            step=result.summary["steps"],
        )
        run.log_metrics({f"time/{k}": v for k, v in result.timing.items()},
                        step=result.summary["steps"])
        run.log_artifact(out.train_csv)
    checkpoint.remove(ckpt_dir)
    kdist.shutdown(dist)
    print(
        f"{arm}: {summary['steps']} steps, {result.timing['tokens_per_s']:.0f} tokens/s, "
        f"final loss {summary['final/loss/total']:.4f}"
    )


if __name__ == "__main__":
    cli.run(main)
