"""Bits per byte: a language model's loss in a unit that does not depend on its tokenizer.

    bpb = Σ_t NLL_t / (ln 2 · Σ_t bytes_t)

over the predicted tokens t, NLL_t = −ln q(t | prefix) in nats and bytes_t the number of UTF-8
bytes token t spells. Per-token loss rewards a tokenizer with long tokens (fewer, harder
predictions); per byte, a teacher and a student with different tokenizers are scored on the same
text in the same unit (the measure of Gao et al. 2020, "The Pile", and of nanochat's
``evaluate_bpb``). Across batches, sum the NLLs and the bytes separately and divide once: the
mean of per-batch ratios weights short batches too much.

Which tokens count is the caller's ``mask``. Leave out special tokens (EOS, padding): they spell
no bytes, and counting a predicted EOS's loss would charge one tokenizer for a convention the
other may not share — nanochat drops them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kd.causal.xtok.align import char_to_byte_offsets


def bits_per_byte(nll: Tensor, n_bytes: Tensor, mask: Tensor | None = None) -> float:
    """Σ NLL / (ln 2 · Σ bytes) over the tokens ``mask`` keeps (all by default); ``nll`` in
    nats, any shape, ``n_bytes`` the same shape."""
    if nll.shape != n_bytes.shape:
        raise ValueError(f"nll {tuple(nll.shape)} and n_bytes {tuple(n_bytes.shape)} differ")
    nll, n_bytes = nll.detach().double(), n_bytes.double()
    if mask is not None:
        nll, n_bytes = nll[mask], n_bytes[mask]
    total = float(n_bytes.sum())
    if total <= 0:
        raise ValueError("bits per byte over no bytes: every kept token spells 0 bytes")
    return float(nll.sum()) / (math.log(2) * total)


def byte_lengths_from_offsets(
    text: str, offsets: Sequence[tuple[int, int]], unit: str = "char"
) -> Tensor:
    """Per-token byte counts [T] from a fast tokenizer's ``offset_mapping`` (characters, or
    ``unit="byte"``). Each token is charged the bytes from where the previous token ended to
    where it ends, so the counts sum to the text's bytes: tokens that split one character
    (all given that character's span) charge it to the first piece and 0 to the rest, bytes a
    trimmed offset skipped go to the next token, and a (0, 0) special gets 0. Only the sum enters
    bits per byte, so this is exact there; for each token's own bytes use
    :func:`kd.causal.xtok.pieces.byte_lengths`.
    """
    if unit == "char":
        offsets = char_to_byte_offsets(text, offsets)
    elif unit != "byte":
        raise ValueError(f"unit must be 'char' or 'byte', got {unit!r}")
    lengths, done = [], 0
    for _, end in offsets:
        lengths.append(max(end - done, 0))
        done = max(done, end)
    return torch.tensor(lengths, dtype=torch.long)
