"""causal_evaluate@<arm> / causal_evaluate_init: a causal student (or the initial one, with the
teacher beside it) on the held-out blocks — perplexities, KL(teacher ‖ student) at T = 1 per batch,
top-1 agreement — its greedy continuations of the fixed prompts, and the downstream linear probe
(the MLM family's: kd/probe, on mean-pooled final hidden states; no fine-tune)."""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.causal import outputs
from kd.causal.evaluate import continuations, prompt_problem, score
from kd.core import cli, runtime, tracking
from kd.core.io import write_json
from kd.core.params import ParamsError, load_params
from kd.probe import probe


def linear_probes(p, models: dict, tokenizer, device) -> dict[str, float]:
    """Held-out accuracy of the probe section's linear probe on each model's mean-pooled final
    hidden states (the models share ``tokenizer``), on at most causal.probe_examples texts
    (stratified); none when that is 0. The texts are read and tokenized once."""
    if not p.causal.probe_examples:
        return {}
    cfg = p.probe.model_copy(update={"max_examples": p.causal.probe_examples})
    data, train_rows, test_rows = probe.load_split(cfg)
    ids = probe.tokenize(tokenizer, data.texts, cfg.max_seq_length)
    return {name: probe.linear_accuracy(m.base_model, ids, probe.pad_token_id(tokenizer),
                                        data.labels, train_rows, test_rows, cfg, device)
            for name, m in models.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--arm", help="a scheme name listed in causal.arms")
    who.add_argument("--init", action="store_true", help="the initial student, and the teacher")
    args = ap.parse_args(argv)
    p = load_params()
    name = outputs.FLOOR if args.init else args.arm
    with outputs.writing(outputs.evaluation(p, name)) as tmp:
        # Unseeded: scoring, greedy decoding and the probe (probe.seed) draw nothing from
        # base.seed, so the initial student's evaluation is reused by every seed.
        device = runtime.setup_unseeded(p.base)
        teacher_dir = outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")
        student_dir = (outputs.need(outputs.folder(p, outputs.STUDENT_INIT), "causal_student")
                       if args.init else outputs.need(outputs.arm(p, name), f"causal_train@{name}"))
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        tok = AutoTokenizer.from_pretrained(student_dir)
        blocks = torch.as_tensor(load_from_disk(str(outputs.need(
            outputs.folder(p, outputs.TOKENS), "causal_tokenize")))["test"]["input_ids"])
        cfg = p.causal.evaluate
        limits = [getattr(m.config, "max_position_embeddings", None) for m in (teacher, student)]
        if any(limits):
            problem = prompt_problem(tok, cfg.prompts, cfg.max_new_tokens,
                                     min(n for n in limits if n))  # fmt: skip
            if problem:  # check_params refuses it first; this guards a stage run on its own
                raise ParamsError(f"causal.evaluate.prompts: {problem}")
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
            probed = {name: student, **({"teacher": teacher} if args.init else {})}
            for model_name, acc in linear_probes(p, probed, tok, device).items():
                run.log_metrics({f"probe/{model_name}_linear_acc": acc})
                summary[f"probe_linear_acc{'' if model_name == name else '_' + model_name}"] = acc
            write_json(tmp / "eval.json", summary)
            pd.DataFrame(rows).to_csv(tmp / "test.csv", index=False)
            write_json(tmp / "continuations.json", {"prompts": cfg.prompts, "text": texts})
    print(f"causal {name}: perplexity {summary['perplexity']:.2f} (teacher "
          f"{summary['teacher_perplexity']:.2f}), KL {summary['kl_t1']:.4f}, top-1 agreement "
          f"{summary['top1_agreement']:.3f}")


if __name__ == "__main__":
    cli.run(main)
