"""A tiny distillation run, launched by tests/test_distributed.py on 1 or 2 processes.

    python tests/ddp_worker.py OUT [micro_batch_size] [CACHE]
    torchrun --standalone --nproc-per-node=2 tests/ddp_worker.py OUT

With a CACHE folder (kd.causal.cache, written by the test), the run is the causal family's:
the multi arm on a tiny Llama, its logit term read from the cache, each rank its own rows.

Rank 0 writes OUT/result.pt (final weights and logged rows) and logs one MLflow run.

Environment (tests/test_distributed.py, tests/test_fsdp.py): KD_TEST_PARALLEL=fsdp trains under
FSDP2 (KD_TEST_SHARD_TEACHER=1 shards the teacher too); KD_TEST_STEPS and KD_TEST_CKPT_EVERY
set max_steps and checkpoint_every; KD_TEST_DIE_AT=k makes every process SIGKILL itself as
it logs step k (a kill after the checkpoint before it, with nothing flushed); OUT/ckpt is the
checkpoint folder, so a rerun resumes from it.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from pathlib import Path

import torch
from datasets import Dataset
from tiny import tiny_bert
from transformers import BertForMaskedLM

from kd.core import dist as kdist
from kd.core import tracking
from kd.core.params import Scheme, Train
from kd.data.masking import MaskedBlocks, Masking
from kd.data.tokens import pack
from kd.distill.distiller import Distiller
from kd.training import checkpoint, flops
from kd.training.loop import train

VOCAB = 60


def tiny(hidden: int, layers: int, seed: int) -> BertForMaskedLM:
    return tiny_bert(hidden, layers, seed, VOCAB, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def causal(cache_dir: Path, micro: int | None):
    """The causal multi arm (every term, the logit term from the cache) and its batches."""
    from tiny import causal_blocks, tiny_llama

    from kd.causal.batches import NextTokenBlocks
    from kd.causal.cache import Cache
    from kd.causal.distiller import CausalDistiller
    from kd.causal.students import from_teacher_layers
    from kd.core.params import CausalScheme, CausalTrain

    teacher = tiny_llama(layers=4, vocab=32, seed=0)
    teacher.set_attn_implementation("eager")
    student = from_teacher_layers(teacher, [0, 3])
    scheme = CausalScheme(terms={"logit": 1.0, "hidden": 1.0, "attention": 1.0, "embedding": 1.0})
    d = CausalDistiller(student, 16, scheme, [1, 4])
    cfg = CausalTrain(batch_size=4, micro_batch_size=micro, max_steps=4, log_every=1,
                      warmup_steps=1, lr=1e-3, checkpoint_every=100, attribution_every=2)  # fmt: skip
    return d, teacher, NextTokenBlocks(causal_blocks(), Cache(cache_dir)), cfg, None


def main() -> None:
    out = Path(sys.argv[1])
    micro = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "0" else None
    torch.set_num_threads(1)
    dist, device = kdist.init(torch.device("cpu"))
    if len(sys.argv) > 3:
        d, teacher, batches, cfg, flops_of = causal(Path(sys.argv[3]), micro)
    else:
        d, teacher, batches, cfg, flops_of = mlm(micro)
    env = os.environ.get
    parallel = env("KD_TEST_PARALLEL", "ddp")
    cfg = cfg.model_copy(update={
        "max_steps": int(env("KD_TEST_STEPS", cfg.max_steps)),
        "checkpoint_every": int(env("KD_TEST_CKPT_EVERY", cfg.checkpoint_every)),
        # FSDP takes no per-term gradients (kd.core.params.sharding_problem).
        **({"attribution_every": 0} if parallel == "fsdp" else {}),
    })  # fmt: skip
    resume = checkpoint.load(out / "ckpt", "x")
    with tracking.start_run("train", arm="ddp-test", enabled=dist.main) as run:
        if "KD_TEST_DIE_AT" in os.environ:
            run = DieAt(run, int(os.environ["KD_TEST_DIE_AT"]))
        result = train(
            d,
            teacher,
            batches,
            cfg,
            parallel=parallel,
            shard_teacher=env("KD_TEST_SHARD_TEACHER") == "1",
            resume=resume,
            seed=0,
            precision="fp32",
            device=device,
            flops_of=flops_of,
            run=run,
            ckpt_dir=out / "ckpt",
            fingerprint="x",
            dist=dist,
        )
    # For the closing note's table (stdout only): peak RSS of this process and step time.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"rank {dist.rank}: peak RSS {peak} MiB, {result.timing['seconds']:.2f} s "
          f"for {len(result.rows)} logged steps", flush=True)  # fmt: skip
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        state = result.state if result.state is not None else d.state_dict()
        torch.save({"state": state, "rows": result.rows, "resumed": resume is not None},
                   out / "result.pt")  # fmt: skip
    kdist.shutdown(dist)


class DieAt:
    """A run that kills its process, as a kill -9 would, when step ``at`` is logged."""

    def __init__(self, run, at: int):
        self.run, self.at = run, at

    def __getattr__(self, name):
        return getattr(self.run, name)

    def log_metrics(self, metrics, step):
        if step >= self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.run.log_metrics(metrics, step=step)


def mlm(micro: int | None):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, VOCAB, (20,), generator=g).tolist() for _ in range(40)]
    cols = pack(docs, 16, cls_id=1, sep_id=2, pad_id=0)
    cols["mlm_input_ids"] = cols["input_ids"]
    cols["mlm_labels"] = cols["input_ids"]
    ds = Dataset.from_dict({k: v.tolist() for k, v in cols.items()})
    teacher = tiny(24, 3, seed=1)
    # Every non-pad position scored: each micro-batch has the same number of positions, so the
    # mean of per-rank means equals the full-batch mean and only float summation order differs.
    scheme = Scheme(terms={"hidden": 1.0, "attention": 1.0, "logit": 1.0}, logit_positions="all")
    d = Distiller(tiny(16, 2, seed=2), teacher, scheme)
    cfg = Train(
        batch_size=8,
        micro_batch_size=micro,
        max_steps=4,
        log_every=1,
        warmup_steps=1,
        lr=1e-3,
        checkpoint_every=100,
    )
    batches = MaskedBlocks(ds, Masking("dynamic", 3, VOCAB, 0.15))
    return d, teacher, batches, cfg, flops.StepFlops(d, teacher.config)


if __name__ == "__main__":
    main()
