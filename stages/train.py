"""train@<arm>: distil the teacher into the initial student with the arm's scheme."""

from __future__ import annotations

import argparse

import pandas as pd
from transformers import AutoModelForMaskedLM, AutoTokenizer

from kd.core import arms, cli, runtime
from kd.core import dist as kdist
from kd.core.io import atomic_file, dir_digest, need, read_json, write_json
from kd.core.params import load_params
from kd.data import tokens
from kd.data.masking import MaskedBlocks, Masking
from kd.distill.distiller import Distiller
from kd.training import checkpoint, flops, stage


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arm", required=True, help="a scheme name listed in loss.arms")
    args = ap.parse_args(argv)
    p = load_params()
    run_stage(p, arms.arm(p, args.arm))


def resume_fingerprint(p, arm: str, masking: Masking, init_hash: str) -> str:
    """Everything the next step depends on: a checkpoint written under another value of any of
    these is ignored (kd/training/checkpoint.py), never continued. The teacher's and the train
    tokens' folders by content (every weight shard, every Arrow file), the masking by its mask
    rate and token, the scheme, the train and base sections, and the initial student."""
    return checkpoint.fingerprint(
        arm,
        p.loss.schemes[arm].model_dump(),
        p.train.model_dump(),
        kdist.identity(p.base),
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
    init_hash = stage.initial_weights(
        init, read_json(p.paths.metrics / "student_init.json")["weights_sha256"],
        p.paths.student_init, "init_student")  # fmt: skip
    distiller = Distiller(init, teacher, scheme)
    masking = Masking(p.train.masking, tok.mask_token_id, len(tok), p.tokenize.mlm_probability)
    rt = runtime.record(device, p.base.precision,
                        runtime.attention_implementation(p.base.attention, device))
    job = stage.Arm(
        "train", arm, p.base.seed, p.base.precision, p.base.attention, p.paths.checkpoints / arm,
        resume_fingerprint(p, arm, masking, init_hash),
        run_params={"scheme": scheme.model_dump(), "train": p.train.model_dump(),
                    "seed": p.base.seed},
        tags={"kd.scheme_terms": ",".join(scheme.active_terms), "kd.student_init_sha256": init_hash},
        runtime=rt, parallel=p.base.parallel, shard_teacher=p.base.shard_teacher,
    )  # fmt: skip
    with stage.run(job, distiller, teacher, MaskedBlocks(ds, masking), p.train, device=device,
                   dist=dist, flops_of=flops.StepFlops(distiller, teacher.config),
                   dataset=(ds, "tokens/train", p.paths.tokens / "train")) as done:  # fmt: skip
        if done is None:
            return  # not rank 0
        result, run = done
        stage.save_student(out.student, distiller, tok, {
            "arm": arm,
            "scheme": scheme.model_dump(),
            "layer_map": distiller.layer_map,
            "train": p.train.model_dump(),
            "seed": p.base.seed,
            "student_init_sha256": init_hash,
            "runtime": rt,
        }, result.state)  # fmt: skip
        with atomic_file(out.train_csv) as f:
            pd.DataFrame(result.rows).to_csv(f, index=False)
        write_json(out.train_json, {**result.summary, "layer_map": distiller.layer_map,
                                    "runtime": rt})  # fmt: skip
        run.log_artifact(out.train_csv)


if __name__ == "__main__":
    cli.run(main)
