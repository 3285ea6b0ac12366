"""A tiny teacher cache written by 1 or 2 processes, for tests/test_causal_cache.py.

python tests/cache_worker.py OUT
torchrun --standalone --nproc-per-node=2 tests/cache_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny import tiny_llama

from kd.causal import cache
from kd.core import dist as kdist


def tokens():
    from datasets import Dataset

    ids = torch.randint(0, 64, (7, 9), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist, _ = kdist.init(torch.device("cpu"))
    cache.write(tiny_llama(seed=0), tokens(), out / "cache", k=8, batch_size=2, dtype="float16",
                shard_blocks=2, work=out / "work", dist=dist)  # fmt: skip
    kdist.shutdown(dist)


if __name__ == "__main__":
    main()
