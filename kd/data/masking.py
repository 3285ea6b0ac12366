"""Masked-LM corruption (BERT, Devlin et al. 2019): choose positions, corrupt them 80/10/10.

One function serves the tokenize stage (the fixed evaluation masks, from ``tokenize.mask_seed``)
and the training loop (fresh masks per batch, from the training seed), and both take an explicit
generator so a mask never depends on who else drew random numbers before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (corrupted input ids, labels) for a [B, L] batch.

    Each non-special position is chosen with ``probability``; of the chosen, 80% become
    [MASK], 10% a uniformly random token, 10% stay. Labels hold the original id at chosen
    positions and -100 elsewhere. At least one position per row is chosen when the row has any
    real token, so no row contributes an empty target set.
    """
    ids = input_ids.clone()
    candidates = ~special_tokens_mask.bool()
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < probability) & candidates
    # Rows where chance chose nothing: take their lowest-draw candidate instead.
    empty = ~chosen.any(dim=1) & candidates.any(dim=1)
    if empty.any():
        fallback = draw.masked_fill(~candidates, 2.0).argmin(dim=1)
        chosen[empty, fallback[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    how = torch.rand(ids.shape, generator=generator)
    ids[chosen & (how < 0.8)] = mask_token_id
    randomise = chosen & (how >= 0.8) & (how < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    ids[randomise] = random_ids[randomise]
    return ids, labels


@dataclass(frozen=True)
class Masking:
    """How a batch's MLM inputs are made: the tokenize stage's fixed masks, or fresh ones."""

    mode: str  # "static" | "dynamic"
    mask_token_id: int
    vocab_size: int
    probability: float


class MaskedBlocks:
    """The MLM family's batches for the training loop (kd/training/loop.py): packed blocks of
    the tokenize stage's Arrow split, masked by ``masking``."""

    def __init__(self, ds, masking: Masking):
        self.ds, self.masking = ds, masking

    def __len__(self) -> int:
        return len(self.ds)

    def __call__(self, indices: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The global batch of ``indices``; fresh masks are drawn from ``gen`` over the whole
        batch, so a row's masks never depend on how many processes share it."""
        rows, masking = self.ds[indices], self.masking
        batch = {"attention_mask": torch.as_tensor(rows["attention_mask"], dtype=torch.long)}
        if masking.mode == "static":
            batch["input_ids"] = torch.as_tensor(rows["mlm_input_ids"], dtype=torch.long)
            batch["labels"] = torch.as_tensor(rows["mlm_labels"], dtype=torch.long)
        else:
            batch["input_ids"], batch["labels"] = mask_tokens(
                torch.as_tensor(rows["input_ids"], dtype=torch.long),
                torch.as_tensor(rows["special_tokens_mask"]),
                masking.mask_token_id,
                masking.vocab_size,
                masking.probability,
                gen,
            )
        return batch

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {}  # nothing is read per rank: the whole batch is built above
