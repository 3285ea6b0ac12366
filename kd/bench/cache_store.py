"""What the teacher cache's storage costs: bytes per position and the KL it adds, and the writer's
peak memory against the number of blocks.

    python -m kd.bench.cache_store kl --teacher default --blocks 16
    python -m kd.bench.cache_store memory --blocks 960 [--old]

``kl`` writes the cache of a causal teacher over the first blocks of the offline Wikipedia
sample twice (float32 and float16 log-probabilities, kd/causal/cache.py) and compares them at
every position: KL(float32 store ‖ float16 store) over the k + 1 bins, and the change in the
forward-KL distillation loss of the initial student (a uniform layer subset of the teacher);
plus the bytes per position on disk. ``memory`` writes the cache of a small random Llama with
SmolLM2's vocabulary (49,152 words, so the head, the top-k and the stored rows are the real
size; ``--vocab`` a smaller one, for a quicker run) over ``--blocks`` random blocks of 128 and reports the process' peak resident memory;
``--old`` runs the previous writer (one in-memory list, then an Arrow dataset) from
``git show REV:kd/causal/cache.py`` for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kd.causal import cache
from kd.causal import divergences as D


def _blocks_dataset(ids: torch.Tensor):
    from datasets import Dataset

    # From arrays, not Python lists: the lists of 4x the default blocks would set the peak.
    return Dataset.from_dict({"input_ids": ids.numpy(),
                              "attention_mask": torch.ones_like(ids).numpy()})  # fmt: skip


def _stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in (folder / cache.SHARDS).rglob("*.npy"))


def kl(args) -> dict:
    from kd.bench.topk_error import blocks
    from kd.causal.students import from_teacher_layers, uniform_layers
    from kd.causal.teacher import load
    from kd.data.assets import wiki_offline_file

    teacher, tokenizer = load(args.teacher)
    texts = [v["extract"] for v in json.loads(wiki_offline_file().read_text()).values()]
    ids = blocks(tokenizer, texts, args.seq_len, args.blocks)
    tokens = _blocks_dataset(ids)
    student = from_teacher_layers(teacher, uniform_layers(teacher.config.num_hidden_layers, 15))
    out: dict = {"teacher": args.teacher, "blocks": len(ids), "seq_len": args.seq_len,
                 "k": args.k, "precision": args.precision}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            start = time.perf_counter()
            cache.write(teacher, tokens, Path(tmp) / dtype, args.k, batch_size=args.batch_size,
                        precision=args.precision, dtype=dtype, shard_blocks=args.blocks)  # fmt: skip
            out[f"{dtype}_seconds"] = time.perf_counter() - start
            positions = len(ids) * (args.seq_len - 1)
            out[f"{dtype}_bytes_per_position_on_disk"] = (
                _stored_bytes(Path(tmp) / dtype) / positions
            )
        exact = cache.Cache(Path(tmp) / "float32").support(slice(None))
        compact = cache.Cache(Path(tmp) / "float16").support(slice(None))
    p, q = exact.support(), compact.support()
    store_kl = (p.exp() * (p - q)).sum(-1)
    with torch.no_grad():
        s_logits = torch.cat([student(ids[i : i + args.batch_size]).logits[:, :-1].flatten(0, 1)
                              for i in range(0, len(ids), args.batch_size)])  # fmt: skip
    a = D.per_position(s_logits, exact, D.forward_kl)
    b = D.per_position(s_logits, compact, D.forward_kl)
    out.update(
        old_bytes_per_position=8 * args.k + 4,  # int32 ids, float32 log-probs and rest
        bytes_per_position=cache.bytes_per_position(args.k, teacher.config.vocab_size, "float16"),
        store_kl_mean=float(store_kl.mean()), store_kl_max=float(store_kl.max()),
        loss_float32=float(a.mean()), loss_float16=float(b.mean()),
        loss_abs_diff_mean=float((a - b).abs().mean()), loss_abs_diff_max=float((a - b).abs().max()),
    )  # fmt: skip
    return out


def memory(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=args.seq_len,
    )).eval()  # fmt: skip
    ids = torch.randint(0, args.vocab, (args.blocks, args.seq_len), generator=torch.Generator())
    tokens = _blocks_dataset(ids)
    del ids
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.old:
            old = Path(tmp) / "old_cache.py"
            old.write_text(subprocess.run(["git", "show", f"{args.old}:kd/causal/cache.py"],
                                          capture_output=True, text=True, check=True).stdout)  # fmt: skip
            import importlib.util

            spec = importlib.util.spec_from_file_location("old_cache", old)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mod.write(teacher, tokens, Path(tmp) / "c", args.k, batch_size=args.batch_size)
        else:
            cache.write(teacher, tokens, Path(tmp) / "c", args.k, batch_size=args.batch_size,
                        dtype="float16", shard_blocks=args.shard_blocks)  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"blocks": args.blocks, "vocab": args.vocab, "k": args.k, "writer": f"old ({args.old})" if args.old else "sharded",
            "peak_rss_mib": peak / 1024, "rss_before_write_mib": base / 1024,
            "seconds": time.perf_counter() - start}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kd.bench.cache_store",
                                 description=__doc__.split("\n")[0])  # fmt: skip
    ap.add_argument("what", choices=["kl", "memory"])
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49_152, help="memory: the random Llama's")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-blocks", type=int, default=128)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--old", default=None, help="memory: a git revision whose writer to run")
    args = ap.parse_args(argv)
    result = kl(args) if args.what == "kl" else memory(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
