"""How much of the distillation signal a top-k teacher cache keeps, for k = 8…256.

``python -m kd.bench.topk_error --teacher FOLDER`` runs a causal teacher and the student made of a
uniform subset of its layers (the initial student of the causal family) over held-out text
packed into blocks, and compares, at every position, the forward KL(teacher ‖ student) at T = 1
computed on the whole vocabulary with the same KL on the teacher's top-k tokens plus one bin for
the rest of the mass (what ``kd.causal.cache`` stores). Merging the tail into one bin can only
lower a KL, so the top-k value is a lower bound; the table gives the relative gap, the teacher's
mass outside its top k, and the cache's bytes per position against full float32 logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kd.causal import divergences as D
from kd.causal.cache import bytes_per_position
from kd.causal.students import from_teacher_layers, uniform_layers
from kd.causal.teacher import load
from kd.causal.tokens import pack
from kd.data.corpus import read_split


def blocks(tokenizer, texts: list[str], length: int, count: int) -> torch.Tensor:
    """The first ``count`` full blocks of ``length`` tokens of the texts joined with EOS
    (``kd.causal.tokens.pack``), tokenizing only as many texts as that needs."""
    docs, total = [], 0
    for text in texts:
        docs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        total += len(docs[-1]) + 1
        if total >= length * count:
            break
    packed = pack(docs, length, tokenizer.eos_token_id)["input_ids"][:count]
    if not packed:
        raise SystemExit(f"the corpus holds fewer than {length} tokens")
    return torch.tensor(packed)


@torch.no_grad()
def measure(teacher, student, ids: torch.Tensor, ks: list[int], batch_size: int) -> dict:
    sums = {k: 0.0 for k in ks}
    tail = {k: 0.0 for k in ks}
    full, positions = 0.0, 0
    for start in range(0, len(ids), batch_size):
        x = ids[start : start + batch_size]
        t = teacher(x).logits[:, :-1].flatten(0, 1)
        s = student(x).logits[:, :-1].flatten(0, 1)
        full += float(D.per_position(s, t, D.forward_kl).sum())
        positions += t.shape[0]
        for k in ks:
            support = D.top_k(t, k)
            sums[k] += float(D.per_position(s, support, D.forward_kl).sum())
            if support.rest is not None:
                tail[k] += float(support.rest.exp().sum())
    vocab = teacher.config.vocab_size
    rows = [
        {
            "k": k,
            "kl_topk": sums[k] / positions,
            "relative_gap": 1 - sums[k] / full,
            "teacher_tail_mass": tail[k] / positions,
            # The compact store (kd.causal.cache: float16 log-probs, the smallest id type).
            "bytes_per_position": bytes_per_position(k, vocab, "float16"),
            "old_bytes_per_position": 8 * k + 4,  # int32 id + float32 log-prob, the rest
        }
        for k in ks
    ]
    return {"kl_full": full / positions, "positions": positions, "vocab": vocab,
            "full_bytes_per_position": 4 * vocab, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kd.bench.topk_error", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--teacher", default="default", help="a causal LM: folder, hub name or default")
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument(
        "--corpus", default="data/corpus/test.jsonl", help="documents, one JSON per line"
    )
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--out", default="data/bench/topk_error.json")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    teacher, tokenizer = load(args.teacher)
    layers = uniform_layers(teacher.config.num_hidden_layers, args.student_layers)
    student = from_teacher_layers(teacher, layers)
    ids = blocks(
        tokenizer, [d.text for d in read_split(Path(args.corpus))], args.seq_len, args.blocks
    )
    result = measure(teacher, student, ids, args.ks, args.batch_size)
    result.update(teacher=args.teacher, student_layers=layers, corpus=args.corpus,
                  blocks=len(ids), seq_len=args.seq_len)  # fmt: skip
    table = [
        f"KL(teacher ‖ student) at T = 1 on the full vocabulary: {result['kl_full']:.4f} "
        f"({result['positions']} positions)",
        "",
        "| k | KL on top-k + rest | gap to full | teacher mass outside top-k | cache bytes / position |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        table.append(
            f"| {r['k']} | {r['kl_topk']:.4f} | {100 * r['relative_gap']:.2f} % | "
            f"{r['teacher_tail_mass']:.4f} | {r['bytes_per_position']} "
            f"(1/{result['full_bytes_per_position'] / r['bytes_per_position']:.0f} of full logits) |"
        )
    result["table"] = table
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table))
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
