"""The initial student: built once (seeded) from a config or loaded from a checkpoint.

Both training arms load exactly these weights; :func:`weights_hash` lets them prove it.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from kd.core.params import Student
from kd.data.assets import resolve_model
from kd.data.weights import require_intact


def build(cfg: Student, vocab_size: int, max_seq_length: int, seed: int):
    """A TinyBERT-shaped BertForMaskedLM (or the checkpoint ``cfg.checkpoint``), on the CPU."""
    if cfg.checkpoint:
        where = resolve_model(cfg.checkpoint, "student.checkpoint")
        require_intact(where, "student.checkpoint")
        model = AutoModelForMaskedLM.from_pretrained(where)
        if model.config.vocab_size != vocab_size:
            raise SystemExit(
                f"the student checkpoint '{cfg.checkpoint}' has a vocabulary of "
                f"{model.config.vocab_size} word pieces but the teacher's has {vocab_size}: logit "
                "distillation needs one vocabulary; pick a student built on the teacher's "
                "vocabulary, or set student.checkpoint: null to build one from the config"
            )
        return model
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(512, max_seq_length),
    )
    # Seeded right before construction: the weights depend on the seed and nothing else.
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor in the state dict, in key order: equal hashes, equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
