"""Seeded random BERTs small enough for unit tests (one factory for every test file)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM


def tiny_bert(
    hidden: int, layers: int, seed: int, vocab: int, intermediate: int | None = None, **config
) -> BertForMaskedLM:
    """A BertForMaskedLM with 2 heads (unless ``num_attention_heads`` is given), seeded."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate or 2 * hidden,
        **{"num_attention_heads": 2, **config},
    )
    return BertForMaskedLM(cfg)
