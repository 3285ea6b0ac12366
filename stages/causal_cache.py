"""causal_cache: the teacher run once over the train blocks; its top-k next-token distribution
at every position, which the arms' logit terms read instead of running it."""

from __future__ import annotations

import time

from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from kd.causal import cache, outputs
from kd.core import cli, runtime, tracking
from kd.core.io import write_json
from kd.core.params import load_params


def main() -> None:
    p = load_params()
    with outputs.writing(outputs.folder(p, outputs.CACHE)) as tmp:
        if not p.causal.top_k:
            write_json(tmp / "cache.json", {"k": 0, "note": "causal.top_k is 0: the arms run the "
                                           "teacher at every step"})
            print("causal.top_k is 0: no cache")
            return
        device = runtime.setup_unseeded(p.base)  # every seed reuses the cache
        teacher = AutoModelForCausalLM.from_pretrained(
            outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")).to(device)
        train = load_from_disk(str(outputs.need(outputs.folder(p, outputs.TOKENS),
                                                "causal_tokenize")))["train"]  # fmt: skip
        with tracking.start_run("causal_cache", params={"top_k": p.causal.top_k},
                                runtime=runtime.record(device, p.base.precision)
                                ) as run:  # fmt: skip
            start = time.perf_counter()
            meta = cache.write(teacher, train, tmp, p.causal.top_k,
                               batch_size=p.causal.evaluate.batch_size,
                               precision=p.base.precision)  # fmt: skip
            run.log_metrics({"rows": meta["rows"], "time/seconds": time.perf_counter() - start})
    print(f"teacher cache: top-{meta['k']} of {meta['vocab_size']} at {meta['rows']} blocks")


if __name__ == "__main__":
    cli.run(main)
