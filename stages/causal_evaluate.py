"""causal_evaluate@<arm> / causal_evaluate_init: a causal student (or the initial one, with the
teacher beside it) on the held-out blocks — perplexities, KL(teacher ‖ student) at T = 1 per batch,
top-1 agreement — and its greedy continuations of the fixed prompts."""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.causal import outputs
from kd.causal.evaluate import continuations, score
from kd.core import cli, runtime, tracking
from kd.core.io import write_json
from kd.core.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--arm", help="a scheme name listed in causal.arms")
    who.add_argument("--init", action="store_true", help="the initial student, and the teacher")
    args = ap.parse_args(argv)
    p = load_params()
    name = outputs.FLOOR if args.init else args.arm
    with outputs.writing(p, outputs.evaluation(p, name)) as tmp:
        if tmp is None:
            return
        device, _ = runtime.setup(p.base)
        teacher_dir = outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")
        student_dir = (outputs.need(outputs.folder(p, outputs.STUDENT_INIT), "causal_student")
                       if args.init else outputs.need(outputs.arm(p, name), f"causal_train@{name}"))
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        tok = AutoTokenizer.from_pretrained(student_dir)
        blocks = torch.as_tensor(load_from_disk(str(outputs.need(
            outputs.folder(p, outputs.TOKENS), "causal_tokenize")))["test"]["input_ids"])
        cfg = p.causal.evaluate
        with tracking.start_run("causal_evaluate", arm=name, runtime=runtime.record(device),
                                tags={"kd.family": "causal"}) as run:  # fmt: skip
            rows, summary = score(student, teacher, blocks, cfg.batch_size, device)
            texts = {name: continuations(student, tok, cfg.prompts, cfg.max_new_tokens, device)}
            if args.init:
                texts["teacher"] = continuations(teacher, tok, cfg.prompts, cfg.max_new_tokens,
                                                 device)
            for row in rows:
                run.log_metrics({f"test/{k}": v for k, v in row.items() if k != "batch"},
                                step=row["batch"])
            run.log_metrics({f"summary/{k}": v for k, v in summary.items()})
            write_json(tmp / "eval.json", summary)
            pd.DataFrame(rows).to_csv(tmp / "test.csv", index=False)
            write_json(tmp / "continuations.json", {"prompts": cfg.prompts, "text": texts})
    print(f"causal {name}: perplexity {summary['perplexity']:.2f} (teacher "
          f"{summary['teacher_perplexity']:.2f}), KL {summary['kl_t1']:.4f}, top-1 agreement "
          f"{summary['top1_agreement']:.3f}")


if __name__ == "__main__":
    cli.run(main)
