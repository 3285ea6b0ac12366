"""causal_cache: the teacher run once over the train blocks; its top-k next-token distribution
at every position, which the arms' logit terms read instead of running it.

    python -m kd.training.launch stages.causal_cache   # base.nproc processes share the shards

Shards are written as they are computed into ``paths.checkpoints/causal_cache`` (outside the
DVC out, which DVC deletes before the stage runs), so a killed run resumes after its last
finished shard; the whole cache then moves into the out (kd/causal/cache.py)."""

from __future__ import annotations

import time

from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from kd.causal import cache, outputs
from kd.core import cli, runtime, tracking
from kd.core import dist as kdist
from kd.core.io import dir_digest, write_json
from kd.core.params import load_params

WORK = "causal_cache"  # under paths.checkpoints: the unfinished shards


def main() -> None:
    p = load_params()
    out = outputs.folder(p, outputs.CACHE)
    if not p.causal.top_k:
        if kdist.rank() == 0:
            with outputs.writing(out) as tmp:
                write_json(tmp / cache.META, {"k": 0, "note": "causal.top_k is 0: the arms run "
                                              "the teacher at every step"})  # fmt: skip
        print("causal.top_k is 0: no cache")
        return
    c = p.causal.cache
    device = runtime.setup_unseeded(p.base)  # every seed reuses the cache
    dist, device = kdist.init(device)
    teacher_dir = outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")
    tokens_dir = outputs.need(outputs.folder(p, outputs.TOKENS), "causal_tokenize")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).to(device)
    train = load_from_disk(str(tokens_dir))["train"]
    # The identity training checks the cache against (stages/causal_train.py computes the same).
    sources = {"teacher": dir_digest(teacher_dir), "tokens": dir_digest(tokens_dir / "train")}
    work = p.paths.checkpoints / WORK
    with tracking.start_run(
        "causal_cache", params={"top_k": p.causal.top_k, **c.model_dump(), "nproc": dist.world},
        runtime=runtime.record(device, p.base.precision), enabled=dist.main,
    ) as run:  # fmt: skip
        start = time.perf_counter()
        meta = cache.write(teacher, train, out, p.causal.top_k, batch_size=c.batch_size,
                           precision=p.base.precision, dtype=c.logprobs,
                           shard_blocks=c.shard_blocks, sources=sources, work=work,
                           dist=dist)  # fmt: skip
        if meta is not None:
            run.log_metrics({"rows": meta["rows"], "shards": len(meta["shards"]),
                             "bytes_per_position": meta["bytes_per_position"],
                             "time/seconds": time.perf_counter() - start})  # fmt: skip
    kdist.shutdown(dist)
    if meta is not None:
        print(f"teacher cache: top-{p.causal.top_k} of {meta['vocab_size']} at {meta['rows']} "
              f"blocks, {len(meta['shards'])} shards, "
              f"{meta['bytes_per_position']} bytes per position")  # fmt: skip


if __name__ == "__main__":
    cli.run(main)
