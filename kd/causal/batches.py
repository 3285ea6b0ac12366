"""The causal family's batches for the one training loop (kd/training/loop.py).

A batch is ``input_ids`` [B, L] of full blocks (packed text, no padding). With GKD's on-policy
rows (``kd.causal.onpolicy``) a share of them is the student's own continuation, written from a
seed drawn from the step's generator, so a resumed step writes the same text. With the teacher
cache, each rank reads the cache's rows for its own share of the batch (:meth:`rows`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd.causal.cache import Cache
from kd.causal.onpolicy import mix_in_student_text
from kd.core.params import CausalTrain


class NextTokenBlocks:
    def __init__(self, blocks: Tensor, cache: Cache | None = None,
                 student: nn.Module | None = None, cfg: CausalTrain | None = None):  # fmt: skip
        """``blocks`` [N, L] token ids; ``cache`` row-aligned with them; ``student`` and
        ``cfg`` (its ``onpolicy*`` keys) for on-policy rows, whose text no cache has seen."""
        self.blocks, self.cache = blocks, cache
        self.onpolicy = cfg.onpolicy if cfg is not None else 0.0
        if self.onpolicy and (student is None or cache is not None):
            raise ValueError("on-policy rows need the student, and the online teacher: no cache")
        self.student, self.cfg = student, cfg

    def __len__(self) -> int:
        return len(self.blocks)

    def __call__(self, indices: list[int], gen: torch.Generator) -> dict[str, Tensor]:
        ids = self.blocks[indices]
        if self.onpolicy:
            cfg = self.cfg
            # A seed per step: the same rows get the same continuation on a resume. The whole
            # batch is written on every rank (the same text whatever the process count).
            seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
            device = next(self.student.parameters()).device
            ids, _ = mix_in_student_text(self.student, ids.to(device), self.onpolicy,
                                         cfg.onpolicy_prompt, seed, cfg.onpolicy_temperature)  # fmt: skip
        return {"input_ids": ids}

    def rows(self, indices: list[int]) -> dict[str, Tensor]:
        return {} if self.cache is None else self.cache.rows(indices)
