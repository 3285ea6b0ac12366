"""prepare_teacher: load the teacher, adapt an MLM head when it has none, score it, save it."""

from __future__ import annotations

import sys

from kd.core import cli, runtime, tracking
from kd.core.io import atomic_dir, write_json
from kd.core.params import load_params
from kd.data import assets, tokens
from kd.models import teacher


def main() -> None:
    p = load_params()
    device, gen = runtime.setup(p.base, seed=p.teacher.seed)
    dd = tokens.load(p.paths.tokens)
    # The tokenizer the token dataset was built with (see assets.tokenizers): saved alongside.
    tokenizer = assets.load_tokenizer(p.tokenize.teacher_tokenizer or p.teacher.source)
    model, has_head = teacher.load_teacher(p.teacher.source)
    model.to(device)
    adapt = not has_head and p.teacher.adapt_steps > 0
    if not has_head and not adapt:
        print(
            "warning: the teacher has no MLM head and teacher.adapt_steps is 0: its head stays "
            "random and its logits mean nothing (set teacher.adapt_steps > 0 to adapt it)",
            file=sys.stderr,
        )
    print(f"teacher '{p.teacher.source}': MLM head {'present' if has_head else 'missing'}")
    attention = runtime.attention_implementation(p.base.attention, device) if adapt else None
    rt = runtime.record(device, p.base.precision, attention)
    with tracking.start_run(
        "prepare_teacher", params=p.teacher.model_dump(), runtime=rt, system_metrics=True
    ) as run:
        for split in ("train", "test"):
            run.log_dataset(dd[split], f"tokens/{split}", p.paths.tokens / split,
                            "training" if split == "train" else "evaluation")
        run.set_tags({"kd.teacher_adapted": adapt})
        info = {"adapt_steps": 0}
        if adapt:
            info = teacher.adapt(
                model,
                dd["train"],
                p.teacher,
                p.base,
                device,
                gen,
                run,
                mask_token_id=tokenizer.mask_token_id,
                mlm_probability=p.tokenize.mlm_probability,
            )
        scores = teacher.evaluate_mlm(
            model,
            dd["test"],
            p.teacher.batch_size,
            p.teacher.eval_batches,
            device,
            p.base.precision,
        )
        result = {**scores, "adapted": adapt, "adapt_steps": info["adapt_steps"]}
        with atomic_dir(p.paths.teacher) as tmp:
            teacher.save(model, tokenizer, tmp)
        write_json(p.paths.metrics / "teacher.json", {**result, "runtime": rt})
        run.log_metrics({f"teacher.{k}": float(v) for k, v in result.items()})
        if adapt:  # wall time: MLflow only, never in an output DVC hashes
            run.log_metrics({"time/adapt_seconds": info["adapt_seconds"]})
    print(
        f"teacher: masked top-1 {result['top1']:.1%}, top-5 {result['top5']:.1%}, "
        f"loss {result['mlm_loss']:.3f} on {result['masked_positions']} positions"
        + (f" after {info['adapt_steps']} steps ({info['adapt_seconds']:.0f} s)" if adapt else "")
    )


if __name__ == "__main__":
    cli.run(main)
