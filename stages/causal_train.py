"""causal_train@<arm>: distil the causal teacher into the initial causal student with the arm's
scheme (kd/causal/training.py); the logit term reads the teacher cache when there is one."""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from datasets import load_from_disk
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kd.causal import outputs
from kd.causal.cache import Cache
from kd.causal.training import CausalDistiller, layer_map, train
from kd.core import cli, runtime, tracking
from kd.core.io import dir_digest, read_json, write_json
from kd.core.params import load_params
from kd.models.student import weights_hash
from kd.training import checkpoint


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arm", required=True, help="a scheme name listed in causal.arms")
    arm = ap.parse_args(argv).arm
    p = load_params()
    with outputs.writing(p, outputs.arm(p, arm)) as tmp:
        if tmp is not None:
            run_stage(p, arm, tmp)


def run_stage(p, arm: str, out) -> None:
    if arm not in p.causal.schemes:
        raise SystemExit(f"--arm {arm!r} is not a scheme of causal.schemes")
    scheme, cfg = p.causal.schemes[arm], p.causal.train
    device, _ = runtime.setup(p.base)
    teacher_dir = outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")
    init_dir = outputs.need(outputs.folder(p, outputs.STUDENT_INIT), "causal_student")
    tokens_dir = outputs.need(outputs.folder(p, outputs.TOKENS), "causal_tokenize")
    # The attention term compares attention maps, which only the eager kernel forms.
    attn = {"attn_implementation": "eager"} if scheme.terms.get("attention", 0) > 0 else {}
    student = AutoModelForCausalLM.from_pretrained(init_dir, **attn)
    if not attn:  # base.attention: auto is eager on the CPU, whose backward is faster there
        runtime.use_training_attention(student, p.base.attention, device)
    init = read_json(init_dir / "kd_student.json")
    if weights_hash(student) != init["weights_sha256"]:
        raise SystemExit(f"{init_dir} does not hold the weights causal_student recorded: "
                         "rebuild it with `dvc repro -f causal_student`")
    use_cache = p.causal.top_k > 0 and not cfg.onpolicy
    cache = Cache(outputs.need(outputs.folder(p, outputs.CACHE), "causal_cache")) if use_cache else None
    online = scheme.uses_intermediate or cache is None
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, **attn) if online else None
    t_cfg = AutoConfig.from_pretrained(teacher_dir)
    layers = layer_map(scheme, init["kept_teacher_blocks"], student.config.num_hidden_layers,
                       t_cfg.num_hidden_layers)
    distiller = CausalDistiller(student, t_cfg.hidden_size, scheme, layers)
    blocks = torch.as_tensor(load_from_disk(str(tokens_dir))["train"]["input_ids"])

    ckpt_dir = p.paths.checkpoints / f"causal-{arm}"
    fingerprint = checkpoint.fingerprint(
        "causal", arm, scheme.model_dump(), cfg.model_dump(), p.base.model_dump(),
        init["weights_sha256"], dir_digest(teacher_dir), dir_digest(tokens_dir / "train"),
        dir_digest(outputs.folder(p, outputs.CACHE)) if cache is not None else None,
    )
    resume = checkpoint.load(ckpt_dir, fingerprint)
    rt = runtime.record(device, p.base.precision, student.config._attn_implementation)
    with tracking.start_run(
        "causal_train", arm=arm, run_id=resume.get("mlflow_run_id") if resume else None,
        params=None if resume else {"scheme": scheme.model_dump(), "train": cfg.model_dump(),
                                    "seed": p.base.seed, "teacher_cache": use_cache},
        tags={"kd.family": "causal", "kd.scheme_terms": ",".join(distiller.terms)},
        runtime=rt, system_metrics=True,
    ) as run:  # fmt: skip
        result = train(distiller, teacher, blocks, cache, cfg, seed=p.base.seed, device=device,
                       precision=p.base.precision, run=run, ckpt_dir=ckpt_dir,
                       fingerprint=fingerprint, resume=resume)  # fmt: skip
        distiller.student.save_pretrained(out)
        AutoTokenizer.from_pretrained(init_dir).save_pretrained(out)
        if distiller.projections is not None:
            torch.save(distiller.projections.state_dict(), out / "projections.pt")
        summary = {**result.summary, "layer_map": layers, "teacher_cache": use_cache,
                   "runtime": rt}  # fmt: skip
        write_json(out / "train.json", summary)
        pd.DataFrame(result.rows).to_csv(out / "train.csv", index=False)
        run.log_metrics({f"time/{k}": v for k, v in result.timing.items()}, step=result.summary["steps"])
    checkpoint.remove(ckpt_dir)
    print(f"causal {arm}: {summary['steps']} steps, {result.timing['tokens_per_s']:.0f} tokens/s, "
          f"final loss {summary['final/loss/total']:.4f}")


if __name__ == "__main__":
    cli.run(main)
