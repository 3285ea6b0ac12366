"""causal_train@<arm>: distil the causal teacher into the initial causal student with the arm's
scheme, in the one training loop (kd/training/loop.py) under ``base.nproc`` processes; the logit
term reads the teacher cache when there is one, each rank its own rows."""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from datasets import load_from_disk
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kd.causal import outputs
from kd.causal.batches import NextTokenBlocks
from kd.causal.cache import Cache, identity
from kd.causal.distiller import CausalDistiller, layer_map
from kd.core import cli, runtime
from kd.core import dist as kdist
from kd.core.io import dir_digest, read_json, write_json
from kd.core.params import load_params
from kd.training import checkpoint, stage


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arm", required=True, help="a scheme name listed in causal.arms")
    arm = ap.parse_args(argv).arm
    p = load_params()
    if kdist.rank() != 0:  # under torchrun, rank 0 alone writes
        run_stage(p, arm, None)
        return
    with outputs.writing(outputs.arm(p, arm)) as tmp:
        run_stage(p, arm, tmp)


def run_stage(p, arm: str, out) -> None:
    if arm not in p.causal.schemes:
        raise SystemExit(f"--arm {arm!r} is not a scheme of causal.schemes")
    scheme, cfg = p.causal.schemes[arm], p.causal.train
    device, _ = runtime.setup(p.base)
    dist, device = kdist.init(device)
    teacher_dir = outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")
    init_dir = outputs.need(outputs.folder(p, outputs.STUDENT_INIT), "causal_student")
    tokens_dir = outputs.need(outputs.folder(p, outputs.TOKENS), "causal_tokenize")
    student = AutoModelForCausalLM.from_pretrained(init_dir)
    init = read_json(init_dir / "kd_student.json")
    init_hash = stage.initial_weights(student, init["weights_sha256"], init_dir, "causal_student")
    use_cache = p.causal.top_k > 0 and not cfg.onpolicy
    cache_dir = outputs.folder(p, outputs.CACHE)
    sources = dir_digest(teacher_dir), dir_digest(tokens_dir / "train")
    # Refused unless computed from these very teacher, tokens and params (one paragraph).
    expect = identity(*sources, p.causal.top_k, 1.0, p.base.precision, p.causal.cache.logprobs)
    cache = Cache(outputs.need(cache_dir, "causal_cache"), expect) if use_cache else None
    t_cfg = AutoConfig.from_pretrained(teacher_dir)
    layers = layer_map(scheme, init["kept_teacher_blocks"], student.config.num_hidden_layers,
                       t_cfg.num_hidden_layers)  # fmt: skip
    distiller = CausalDistiller(student, t_cfg.hidden_size, scheme, layers)
    teacher = None
    if scheme.uses_intermediate or cache is None:  # the cache stands in for the logits only
        # The attention term compares attention maps, which only the eager kernel forms.
        attn = {"attn_implementation": "eager"} if distiller.eager_attention else {}
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, **attn)
    blocks = torch.as_tensor(load_from_disk(str(tokens_dir))["train"]["input_ids"])
    batches = NextTokenBlocks(blocks, cache, distiller.student, cfg)
    attention = "eager" if distiller.eager_attention else runtime.attention_implementation(
        p.base.attention, device)  # fmt: skip
    rt = runtime.record(device, p.base.precision, attention)
    job = stage.Arm(
        "causal_train", arm, p.base.seed, p.base.precision, p.base.attention,
        p.paths.checkpoints / f"causal-{arm}",
        checkpoint.fingerprint(
            "causal", arm, scheme.model_dump(), cfg.model_dump(), kdist.identity(p.base), init_hash,
            *sources,
            dir_digest(cache_dir) if cache is not None else None,
        ),
        run_params={"scheme": scheme.model_dump(), "train": cfg.model_dump(),
                    "seed": p.base.seed, "teacher_cache": use_cache},
        tags={"kd.family": "causal", "kd.scheme_terms": ",".join(distiller.terms),
              "kd.student_init_sha256": init_hash},
        runtime=rt, parallel=p.base.parallel, shard_teacher=p.base.shard_teacher,
    )  # fmt: skip
    with stage.run(job, distiller, teacher, batches, cfg, device=device, dist=dist) as done:
        if done is None:
            return  # not rank 0
        result, _ = done
        stage.save_student(out, distiller, AutoTokenizer.from_pretrained(init_dir), {
            "arm": arm, "scheme": scheme.model_dump(), "layer_map": layers,
            "train": cfg.model_dump(), "seed": p.base.seed, "student_init_sha256": init_hash,
            "teacher_cache": use_cache, "runtime": rt,
        }, result.state)  # fmt: skip
        write_json(out / "train.json", {**result.summary, "layer_map": layers,
                                        "teacher_cache": use_cache, "runtime": rt})  # fmt: skip
        pd.DataFrame(result.rows).to_csv(out / "train.csv", index=False)


if __name__ == "__main__":
    cli.run(main)
