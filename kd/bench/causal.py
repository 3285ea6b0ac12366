"""Benchmark of the causal distillation step: the naive way against this project's, as ratios.

``python -m kd.bench.causal`` times full training steps (forward, backward, AdamW) of a causal
student distilled from a causal teacher, on SmolLM2-135M's shapes (30 layers, hidden 576, 9
heads over 3 key/value heads, vocabulary 49,152; random weights: speed does not depend on
them) with a student of 15 of its layers, for both arms:

- ``naive``: what a plain implementation does — the teacher and the student with
  ``output_hidden_states`` and (multi arm) eager ``output_attentions``, full-vocabulary float32
  logits at every position, then the losses on those;
- ``project``: ``kd.causal.distiller.terms`` — forward hooks, the chunked logit loss;
- ``project+cache`` (logit arm): the same with the teacher's top-k support precomputed (what
  the cache stage stores), so no teacher runs in the step;
- ``trl`` (logit arm): TRL's distillation loss path on the same models — what its
  ``DistillationTrainer._compute_loss`` does (both backbones' last hidden states, then
  ``trl.trainer.distillation_trainer._chunked_divergence_loss`` with β = 0, its forward
  KL(teacher ‖ student), projecting through both LM heads tile by tile). TRL has no hidden-state
  or attention terms, so the multi arm has no TRL row. The function is private to TRL, so the
  version is pinned (``trl==1.16.0``, a dev dependency); without TRL the row records why.

``naive`` runs in float32, as a plain implementation does; ``project`` and ``trl`` run in both
float32 and the pipeline's precision (``base.precision`` of params.yaml: bf16 autocast where the
device makes it faster, else those rows are left out), ``project+cache`` in the pipeline's
precision. The allocator and threads are set as every stage sets them
(``kd.core.runtime.configure``): the time is the step the pipeline trains with.

Per row: seconds per step (median after warm-up steps), tokens/s, peak resident memory added by
the row (VmHWM reset per row), model FLOPs per step counted from the shapes, and MFU against a
matmul peak of the row's dtype measured in the same run. Every row of an arm computes its terms
on the same first batch from the same weights, and they must agree (the cached row's logit term
is the top-k lower bound).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kd.bench.bench import PeakRSS, matmul_peak, time_steps
from kd.causal import divergences as D
from kd.causal.distiller import CausalDistiller
from kd.causal.students import from_teacher_layers, uniform_layers
from kd.core.params import CausalScheme, load_params
from kd.core.runtime import autocast, configure, effective_precision
from kd.distill.losses import attention_kl

TRL_VERSION = "1.16.0"  # the version whose private loss function trl_terms calls

# SmolLM2-135M (its config.json); the offline default teacher of the causal family.
SMOLLM2_135M = dict(
    vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=100_000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)  # fmt: skip
SCHEMES = {
    "logit": CausalScheme(terms={"logit": 1.0}),
    "multi": CausalScheme(terms={"logit": 1.0, "hidden": 1.0, "attention": 1.0, "embedding": 1.0}),
}


def forward_flops(config, tokens: int, seq_len: int) -> int:
    """Matmul FLOPs of one forward over ``tokens`` tokens in blocks of ``seq_len``: per layer
    the q/k/v/o projections (k and v at the key/value width), the gated MLP's three matrices,
    and QKᵀ and AV over the causal half; then the LM head."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * i + seq_len * h) + h * config.vocab_size
    return 2 * tokens * per_token


def naive_terms(student, teacher, ids, scheme: CausalScheme, layer_map, proj) -> dict:
    """The same terms the plain way: every hidden state, every attention map, full logits."""
    want_attn = scheme.terms.get("attention", 0) > 0
    reps = scheme.uses_intermediate
    s = student(ids, output_hidden_states=reps, output_attentions=want_attn)
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=reps, output_attentions=want_attn)
    div = D.divergence(scheme.divergence)
    s_logits, t_logits = (
        s.logits[:, :-1].flatten(0, 1).float(),
        t.logits[:, :-1].flatten(0, 1).float(),
    )
    out = {"logit": D.next_token_loss(s_logits, t_logits, div, scheme.temperature)}
    if reps:
        mse = torch.nn.functional.mse_loss
        out["embedding"] = mse(proj(s.hidden_states[0], 0), t.hidden_states[0])
        # hidden_states[k] is block k − 1's output, except the last, which HF gives after the
        # final norm (the hooks read the raw output): the hidden terms differ there, the logit
        # and attention terms agree.
        pairs = [
            mse(proj(s.hidden_states[i + 1], i + 1), t.hidden_states[j])
            for i, j in enumerate(layer_map)
        ]
        out["hidden"] = torch.stack(pairs).mean()
        out["attention"] = torch.stack(
            [
                attention_kl(s.attentions[i], t.attentions[j - 1], causal=True, probs=True)
                for i, j in enumerate(layer_map)
            ]
        ).mean()
    out["total"] = sum(scheme.terms[k] * v for k, v in out.items())
    return out


def trl_missing() -> str | None:
    """Why the TRL row cannot run here, or None: TRL absent, or a release other than the one
    whose private loss function :func:`trl_terms` calls."""
    try:
        import trl
    except ImportError as e:
        return f"{e} (pip install trl=={TRL_VERSION})"
    if trl.__version__ != TRL_VERSION:
        return f"the TRL row calls TRL {TRL_VERSION}'s private loss; found {trl.__version__}"
    return None


def trl_terms(student, teacher, ids, scheme: CausalScheme) -> dict:
    """TRL's distillation loss on one batch of full blocks, as its trainer computes it: the
    backbones' last hidden states at the predicting positions, then its chunked divergence
    through both LM heads (β = 0: forward KL(teacher ‖ student), as the logit arm's)."""
    if why := trl_missing():
        raise RuntimeError(why)
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    if scheme.divergence != "forward_kl":
        raise ValueError("the TRL row compares the forward KL (β = 0)")
    s_last = student.base_model(input_ids=ids).last_hidden_state[:, :-1]
    with torch.no_grad():
        t_last = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1]
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    mask = torch.ones(s_last.shape[:2], device=ids.device)
    loss, _, _ = _chunked_divergence_loss(
        s_last, t_last, s_head.weight, t_head.weight, mask, beta=0.0,
        student_lm_head_bias=s_head.bias, teacher_lm_head_bias=t_head.bias,
        temperature=scheme.temperature,
    )  # fmt: skip
    return {"logit": loss, "total": loss}


def ways(precision: str) -> list[tuple[str, str, str]]:
    """(arm, way, precision) of every row: float32 for all, and the pipeline's precision too
    where it is another one."""
    low = [precision] if precision != "fp32" else []
    return [
        ("logit", "naive", "fp32"),
        *[("logit", way, p) for way in ("trl", "project") for p in ("fp32", *low)],
        ("logit", "project+cache", precision),
        ("multi", "naive", "fp32"),
        *[("multi", "project", p) for p in ("fp32", *low)],
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kd.bench.causal", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"],
                    help="teacher layers (30: SmolLM2-135M; fewer for a quick run)")  # fmt: skip
    ap.add_argument("--k", type=int, default=64, help="top-k of the cached rows (64)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="the pipeline's precision (default: base.precision of --params)")  # fmt: skip
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/bench/causal.json")
    args = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    base = load_params(args.params).base
    configure(base.threads)  # threads and allocator as every stage: the step the pipeline runs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = effective_precision(device, args.precision or base.precision)
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})
    config._attn_implementation = "eager"  # the multi arm's attention maps need it, both ways
    teacher = LlamaForCausalLM(config).to(device).eval()
    layers = uniform_layers(args.layers, args.student_layers)
    layer_map = [j + 1 for j in layers]  # student block i + 1 came from teacher block j + 1
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
        for _ in range(2)
    ]
    tokens = args.batch_size * args.seq_len
    peaks = {"fp32": matmul_peak(2048, torch.float32, 3, device)}
    if precision == "bf16":
        peaks["bf16"] = matmul_peak(2048, torch.bfloat16, 3, device)
    fwd_t = forward_flops(config, tokens, args.seq_len)
    s_config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": len(layers)})
    fwd_s = forward_flops(s_config, tokens, args.seq_len)
    print(
        "matmul peak "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
        + f"; teacher {args.layers} layers, student {layers}",
        flush=True,
    )

    rows, skipped = [], []
    for arm, way, prec in ways(precision):
        scheme = SCHEMES[arm]
        if way == "trl" and (why := trl_missing()):
            skipped.append({"arm": arm, "way": way, "precision": prec, "why": why})
            print(f"{arm} {way} {prec}: skipped ({why})", flush=True)
            continue
        torch.manual_seed(2)
        student = from_teacher_layers(teacher, layers).train()
        distiller = CausalDistiller(student, config.hidden_size, scheme, layer_map).to(device)
        proj = distiller.projections  # identity maps: the student keeps the teacher's width
        opt = torch.optim.AdamW(distiller.parameters(), lr=1e-5)
        supports = {}
        if way == "project+cache":
            with torch.no_grad():
                for b in batches:
                    logits = teacher(b).logits[:, :-1].flatten(0, 1)
                    supports[b.data_ptr()] = D.top_k(logits, args.k)
        seen = {}

        def step(batch, way=way, prec=prec, student=student, proj=proj, opt=opt,
                 supports=supports, scheme=scheme, seen=seen, distiller=distiller):  # fmt: skip
            opt.zero_grad(set_to_none=True)
            with autocast(device, prec):
                if way == "naive":
                    out = naive_terms(student, teacher, batch, scheme, layer_map, proj)
                elif way == "trl":
                    out = trl_terms(student, teacher, batch, scheme)
                else:
                    cache = supports.get(batch.data_ptr())
                    rows = {"input_ids": batch}
                    if cache is not None:  # the cache's rows, as a training batch carries them
                        b, n = batch.shape[0], batch.shape[1] - 1
                        rows |= {"topk_ids": cache.ids.view(b, n, -1),
                                 "topk_logprobs": cache.logprobs.view(b, n, -1),
                                 "topk_rest": cache.rest.view(b, n)}  # fmt: skip
                    out = distiller(rows, None if cache is not None and not scheme.uses_intermediate
                                    else teacher)  # fmt: skip
                    out["total"] = distiller.total(out)
            out["total"].backward()
            opt.step()
            seen.setdefault(batch.data_ptr(), {k: float(v.detach()) for k, v in out.items()})

        with PeakRSS() as mem:
            times = time_steps(step, batches, args.warmup, args.steps, device)
        sec = sorted(times)[len(times) // 2]
        flops = 3 * fwd_s + (0 if way == "project+cache" else fwd_t)
        rows.append({
            "arm": arm, "way": way, "precision": prec, "step_s": sec,
            "tokens_per_s": tokens / sec, "peak_added_mib": mem.added_mib,
            "model_gflop": flops / 1e9, "mfu": flops / sec / 1e9 / peaks[prec],
            "first_batch_terms": seen[batches[0].data_ptr()],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        del student, distiller, proj, opt, supports

    table = ["| arm | way | precision | step | tokens/s | × naive | peak added | MFU | "
             "logit term (batch 1) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        naive = next(x for x in rows if x["arm"] == r["arm"] and x["way"] == "naive")
        table.append(
            f"| {r['arm']} | {r['way']} | {r['precision']} | {r['step_s']:.2f} s | "
            f"{r['tokens_per_s']:.0f} | {naive['step_s'] / r['step_s']:.2f}× | "
            f"{r['peak_added_mib']:.0f} MiB | {100 * r['mfu']:.1f} % | "
            f"{r['first_batch_terms']['logit']:.5f} |"
        )
    table += [f"| {r['arm']} | {r['way']} | {r['precision']} | skipped: {r['why']} |"
              for r in skipped]  # fmt: skip
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "matmul_peak_gflops": peaks, "precision": precision, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "teacher_layers": args.layers, "student_layers": layers,
        "k": args.k, "rows": rows, "skipped": skipped, "table": table,
        "when": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
