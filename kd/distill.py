"""One distillation step's forward: read both models' representations, compute the scheme's terms.

Representations come from forward hooks (kd/hooks.py) on the base encoder, as in the seed
report; the 30,522-word prediction head runs only on the positions the logit term uses, because
at every position it costs more than the rest of the step. The teacher runs under
``torch.inference_mode`` and yields only the layers the layer map needs.

Terms (weights from the scheme, formulas in kd/losses.py):
  embedding  MSE(W_0 · E_S, E_T)                      over real tokens
  hidden     Σ_i MSE(W_i · H_S,i, H_T,m(i)), i=1..L_S  over real tokens
  attention  Σ_i MSE(A_S,i, A_T,m(i))                   over real (query, key) pairs, mean of heads
  logit      T² · KL(softmax(z_T/T) ‖ softmax(z_S/T))   at masked (or all real) positions
The per-layer sums follow TinyBERT (Jiao et al. 2020); W are learned linear maps with no
activation (with a bias, as TinyBERT's ``fit_dense``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kd import losses
from kd.hooks import attention_probs, attention_scores, capture
from kd.layermap import resolve_layer_map
from kd.masking import IGNORE
from kd.params import Scheme


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def mlm_head(model: nn.Module) -> nn.Module:
    """The masked-LM prediction head (BERT's ``cls``; RoBERTa-style ``lm_head``)."""
    for name in ("cls", "lm_head"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no masked-LM head (cls or lm_head)")


@dataclass
class Reps:
    """What one forward pass yields for the loss terms."""

    last: Tensor | None = None  # [B, L, D] final hidden states
    embedding: Tensor | None = None  # [B, L, D] embedding-layer output
    hidden: list[Tensor] = field(default_factory=list)  # [B, L, D] per requested layer
    scores: list[Tensor] = field(default_factory=list)  # [B, H, L, L] pre-softmax, per layer


def forward_reps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: list[int],
    embedding: bool,
    attention: bool,
) -> Reps:
    """Run the encoder once and return the representations of the 1-based ``layers``."""
    prefix = model.base_model_prefix
    paths = {}
    if embedding:
        paths["embedding"] = f"{prefix}.embeddings"
    for i in layers:
        paths[f"hidden.{i}"] = f"{prefix}.encoder.layer.{i - 1}"
        if attention:
            paths[f"query.{i}"] = f"{prefix}.encoder.layer.{i - 1}.attention.self.query"
            paths[f"key.{i}"] = f"{prefix}.encoder.layer.{i - 1}.attention.self.key"
    with capture(model, paths) as got:
        out = base_model(model)(input_ids=input_ids, attention_mask=attention_mask)
    heads = model.config.num_attention_heads
    return Reps(
        last=out.last_hidden_state,
        embedding=got.get("embedding"),
        hidden=[got[f"hidden.{i}"] for i in layers],
        scores=[
            attention_scores(got[f"query.{i}"], got[f"key.{i}"], heads, attention_mask)
            for i in layers
        ]
        if attention
        else [],
    )


def logit_positions(batch: dict[str, Tensor], where: str) -> Tensor:
    """[B, L] bool: the positions the logit term scores."""
    if where == "masked":
        return batch["labels"] != IGNORE
    return batch["attention_mask"].bool()


class Projections(nn.Module):
    """Linear maps from the student's width to the teacher's, keyed by student layer.

    Index 0 is the embedding output, i the output of layer i. Only the indices a scheme uses get
    a map (an unused map would hold parameters without gradients, which DDP rejects); with
    ``shared`` one map serves them all, as in TinyBERT's code.
    """

    def __init__(self, d_student: int, d_teacher: int, indices: list[int], shared: bool):
        super().__init__()
        self.shared = shared
        keys = ["shared"] if shared else [str(i) for i in indices]
        self.maps = nn.ModuleDict({k: nn.Linear(d_student, d_teacher) for k in keys})

    def forward(self, x: Tensor, index: int) -> Tensor:
        return self.maps["shared" if self.shared else str(index)](x)


class Distiller(nn.Module):
    """The trainable part of a distillation arm: the student plus its projections.

    ``forward(batch, teacher)`` returns every active term of the scheme, unweighted, in float32;
    :func:`total` weights them.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, scheme: Scheme):
        super().__init__()
        s_cfg, t_cfg = student.config, teacher.config
        self.student = student
        self.scheme = scheme
        self.terms = scheme.active_terms
        self.layer_map = resolve_layer_map(
            scheme.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
        )
        if "attention" in self.terms and s_cfg.num_attention_heads != t_cfg.num_attention_heads:
            raise SystemExit(
                f"the attention loss compares heads one to one, but the student has "
                f"{s_cfg.num_attention_heads} heads and the teacher {t_cfg.num_attention_heads}: "
                "give the student as many heads as the teacher (student.num_attention_heads), "
                "or set the attention weight of this scheme to 0"
            )
        indices = ([0] if "embedding" in self.terms else []) + (
            list(range(1, s_cfg.num_hidden_layers + 1)) if "hidden" in self.terms else []
        )
        self.projections = (
            Projections(
                s_cfg.hidden_size, t_cfg.hidden_size, indices, shared=scheme.projection == "shared"
            )
            if indices
            else None
        )

    @property
    def student_layers(self) -> list[int]:
        if "hidden" in self.terms or "attention" in self.terms:
            return list(range(1, len(self.layer_map) + 1))
        return []

    @property
    def teacher_layers(self) -> list[int]:
        return self.layer_map if self.student_layers else []

    def teacher_targets(self, teacher: nn.Module, batch: dict[str, Tensor], where: Tensor):
        """Everything the terms need from the teacher, computed once, without autograd."""
        with torch.inference_mode():
            reps = forward_reps(
                teacher,
                batch["input_ids"],
                batch["attention_mask"],
                self.teacher_layers,
                embedding="embedding" in self.terms,
                attention="attention" in self.terms,
            )
            logits = mlm_head(teacher)(reps.last[where]) if "logit" in self.terms else None
        # Inference tensors cannot be saved for backward; the losses need to save the targets.
        targets = Reps(
            embedding=None if reps.embedding is None else reps.embedding.clone(),
            hidden=[t.clone() for t in reps.hidden],
            scores=[t.clone() for t in reps.scores],
        )
        return targets, None if logits is None else logits.clone()

    def forward(self, batch: dict[str, Tensor], teacher: nn.Module) -> dict[str, Tensor]:
        where = logit_positions(batch, self.scheme.logit_positions)
        t, t_logits = self.teacher_targets(teacher, batch, where)
        s = forward_reps(
            self.student,
            batch["input_ids"],
            batch["attention_mask"],
            self.student_layers,
            embedding="embedding" in self.terms,
            attention="attention" in self.terms,
        )
        mask = batch["attention_mask"]
        out: dict[str, Tensor] = {}
        if "embedding" in self.terms:
            out["embedding"] = losses.hidden_mse(self.projections(s.embedding, 0), t.embedding, mask)
        if "hidden" in self.terms:
            out["hidden"] = sum(
                losses.hidden_mse(self.projections(h, i + 1), th, mask)
                for i, (h, th) in enumerate(zip(s.hidden, t.hidden, strict=True))
            )
        if "attention" in self.terms:
            probs = self.scheme.attention_target == "probs"
            out["attention"] = sum(
                losses.attention_mse(
                    attention_probs(a) if probs else a, attention_probs(ta) if probs else ta, mask
                )
                for a, ta in zip(s.scores, t.scores, strict=True)
            )
        if "logit" in self.terms:
            s_logits = mlm_head(self.student)(s.last[where])
            out["logit"] = losses.logit_kl(s_logits, t_logits, self.scheme.temperature)
        return out

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        return sum(self.terms[name] * value for name, value in terms.items())
