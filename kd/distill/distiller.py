"""One distillation step's forward: read both models' representations, compute the scheme's terms.

Representations come from forward hooks (kd/distill/hooks.py) on the base encoder, as in the original
study; the 30,522-word prediction head runs only on the positions the logit term uses, because
at every position it costs more than the rest of the step. The teacher runs under
``torch.inference_mode`` and yields only the layers the layer map needs.

Terms (weights from the scheme, formulas in kd/distill/losses.py):
  embedding  MSE(W_0 · E_S, E_T)                      over real tokens
  hidden     Σ_i MSE(W_i · H_S,i, H_T,m(i)), i=1..L_S  over real tokens
  attention  Σ_i MSE(A_S,i, A_T,m(i))                   over real (query, key) pairs, mean of heads
  logit      T² · KL(softmax(z_T/T) ‖ softmax(z_S/T))   at masked (or all real) positions
  hidden_cosine        mean(1 − cos(W_L · H_S,L, H_T,last))      DistilBERT, over real tokens
  minilm_attention     KL(A_T,last ‖ A_S,last)                   MiniLM, last layers, mean of heads
  minilm_value         KL(VR_T,last ‖ VR_S,last), VR = softmax(V Vᵀ/√d)   MiniLM, last layers
  rkd_distance         Huber(ψ_D(pool(H_S,last)), ψ_D(pool(H_T,last)))     RKD, over the batch
  rkd_angle            Huber(ψ_A(pool(H_S,last)), ψ_A(pool(H_T,last)))     RKD, over the batch
  activation_boundary  Σ_i AB(C_i · F_S,i, F_T,m(i); μ)           Heo et al., FFN pre-activations
The per-layer sums follow TinyBERT (Jiao et al. 2020); W are learned linear maps with no
activation (with a bias, as TinyBERT's ``fit_dense``).

hidden_cosine compares the *final* hidden states, as DistilBERT does, through the same learned
map W_L that the hidden term uses for the student's last layer (one map when both terms are on;
DistilBERT needs none because its student keeps the teacher's width). MiniLM's terms compare the
student's last layer with the teacher's last layer, whatever the layer map. RKD pools each
sequence's last hidden states over its real tokens and compares the batch's relational
structure, which is scale-free, so it needs no map. activation_boundary hooks the FFN's first
linear (``intermediate.dense``, before the activation) of every student layer i and of teacher
layer m(i); C_i are learned linear maps from the student's intermediate width to the teacher's
(Heo et al. use a 1×1 convolution, the same thing per token). They serve training only: the
connectors are not exported with the student.

Temperature and weights may follow schedules (kd/distill/schedules.py): the training loop calls
:meth:`Distiller.set_progress` before every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kd.core.params import Scheme
from kd.data.masking import IGNORE
from kd.distill import losses, schedules
from kd.distill.hooks import attention_probs, attention_scores, capture
from kd.distill.layermap import resolve_layer_map
from kd.distill.projections import Projections


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
    ffn: list[Tensor] = field(default_factory=list)  # [B, L, F] FFN pre-activations, per layer
    last_scores: Tensor | None = None  # [B, H, L, L] pre-softmax, last layer
    last_values: Tensor | None = None  # [B, L, H·d] value projections, last layer


def forward_reps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: list[int],
    embedding: bool,
    attention: bool,
    *,
    ffn: bool = False,
    last_attention: bool = False,
    last_values: bool = False,
) -> Reps:
    """Run the encoder once and return the representations of the 1-based ``layers``.

    ``attention`` and ``ffn`` add the scores and FFN pre-activations of those layers;
    ``last_attention`` and ``last_values`` the scores and value projections of the last layer.
    """
    prefix = model.base_model_prefix
    n = model.config.num_hidden_layers

    def layer(i: int) -> str:
        return f"{prefix}.encoder.layer.{i - 1}"

    paths = {}
    if embedding:
        paths["embedding"] = f"{prefix}.embeddings"
    score_layers = list(layers) if attention else []
    if last_attention and n not in score_layers:
        score_layers.append(n)
    for i in layers:
        paths[f"hidden.{i}"] = layer(i)
        if ffn:
            paths[f"ffn.{i}"] = f"{layer(i)}.intermediate.dense"
    for i in score_layers:
        paths[f"query.{i}"] = f"{layer(i)}.attention.self.query"
        paths[f"key.{i}"] = f"{layer(i)}.attention.self.key"
    if last_values:
        paths["value.last"] = f"{layer(n)}.attention.self.value"
    with capture(model, paths) as got:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    heads = model.config.num_attention_heads
    # Packed blocks rarely hold padding: then there is nothing to mask (one check per forward).
    score_mask = None if bool(attention_mask.all()) else attention_mask
    scores = {
        i: attention_scores(got[f"query.{i}"], got[f"key.{i}"], heads, score_mask)
        for i in score_layers
    }
    return Reps(
        last=out.last_hidden_state,
        embedding=got.get("embedding"),
        hidden=[got[f"hidden.{i}"] for i in layers],
        scores=[scores[i] for i in layers] if attention else [],
        ffn=[got[f"ffn.{i}"] for i in layers] if ffn else [],
        last_scores=scores[n] if last_attention else None,
        last_values=got.get("value.last"),
    )


def logit_positions(batch: dict[str, Tensor], where: str) -> Tensor:
    """[B, L] bool: the positions the logit term scores."""
    if where == "masked":
        return batch["labels"] != IGNORE
    return batch["attention_mask"].bool()


# Terms that compare attention heads one to one.
HEAD_TERMS = ("attention", "minilm_attention", "minilm_value")
# Terms that read the mapped layers 1..L_S (and their teacher layers).
LAYER_TERMS = ("hidden", "attention", "activation_boundary")


def _clone(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.clone()


def check_compatible(s_cfg, t_cfg, scheme: Scheme) -> list[int]:
    """The scheme's layer map for these two model configs, or a one-paragraph SystemExit.

    Called by :class:`Distiller` and, before any stage runs, by kd/preflight/models.py, which
    has only the configs: a layer map past the teacher's depth or a head-count mismatch is a
    params error.
    """
    try:
        layer_map = resolve_layer_map(
            scheme.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
        )
    except ValueError as err:
        raise SystemExit(str(err)) from None
    by_head = [t for t in HEAD_TERMS if t in scheme.active_terms]
    if by_head and s_cfg.num_attention_heads != t_cfg.num_attention_heads:
        raise SystemExit(
            f"the {', '.join(by_head)} loss compares heads one to one, but the student has "
            f"{s_cfg.num_attention_heads} heads and the teacher {t_cfg.num_attention_heads}: "
            "give the student as many heads as the teacher (student.num_attention_heads), "
            f"or set the weight of {', '.join(by_head)} in this scheme to 0"
        )
    return layer_map


class Distiller(nn.Module):
    """The trainable part of a distillation arm: the student plus its projections.

    ``forward(batch, teacher)`` returns every active term of the scheme, unweighted, in float32;
    :func:`total` weights them with the current weights (see :meth:`set_progress`).
    """

    # The attention terms read scores from hooked queries and keys: any kernel will do.
    eager_attention = False
    # BERT's dropout modules take the loop's cheaper CPU masks (kd/training/dropout.py).
    fast_dropout = True

    def __init__(self, student: nn.Module, teacher: nn.Module, scheme: Scheme):
        super().__init__()
        s_cfg, t_cfg = student.config, teacher.config
        self.student = student
        self.scheme = scheme
        # The weights and temperature of the current step; schedules move them (set_progress).
        self.terms = scheme.active_terms
        self.temperature = schedules.value(scheme.temperature_schedule, scheme.temperature, 0, 1)
        self.layer_map = check_compatible(s_cfg, t_cfg, scheme)
        n_s = s_cfg.num_hidden_layers
        indices = ([0] if "embedding" in self.terms else []) + (
            list(range(1, n_s + 1)) if "hidden" in self.terms else []
        )
        if "hidden_cosine" in self.terms and n_s not in indices:
            indices.append(n_s)
        self.projections = (
            Projections(
                s_cfg.hidden_size, t_cfg.hidden_size, indices, shared=scheme.projection == "shared"
            )
            if indices
            else None
        )
        # Heo et al.'s connectors: student FFN width -> teacher FFN width, one per layer.
        self.connectors = (
            nn.ModuleDict(
                {
                    str(i): nn.Linear(s_cfg.intermediate_size, t_cfg.intermediate_size)
                    for i in range(1, n_s + 1)
                }
            )
            if "activation_boundary" in self.terms
            else None
        )

    def extra_groups(self) -> dict[str, nn.Module]:
        """The trainable modules besides the student, by gradient-norm group name."""
        extra = {"projections": self.projections, "connectors": self.connectors}
        return {k: v for k, v in extra.items() if v is not None}

    def set_progress(self, step: int, total_steps: int) -> None:
        """Set the temperature and term weights of 0-based ``step`` of ``total_steps``.

        A no-op when every schedule is constant, so a scheme without schedules trains exactly as
        before this method existed.
        """
        s = self.scheme
        if schedules.is_constant(s.temperature_schedule) and all(
            schedules.is_constant(w) for w in s.weight_schedules.values()
        ):
            return
        self.temperature = schedules.value(s.temperature_schedule, s.temperature, step, total_steps)
        self.terms = {
            k: schedules.value(s.weight_schedules.get(k), s.terms[k], step, total_steps)
            for k in self.terms
        }

    def _needs(self) -> dict[str, bool]:
        terms = self.terms
        return dict(
            embedding="embedding" in terms,
            attention="attention" in terms,
            ffn="activation_boundary" in terms,
            last_attention="minilm_attention" in terms,
            last_values="minilm_value" in terms,
        )

    @property
    def student_layers(self) -> list[int]:
        if any(t in self.terms for t in LAYER_TERMS):
            return list(range(1, len(self.layer_map) + 1))
        return []

    @property
    def teacher_layers(self) -> list[int]:
        return self.layer_map if self.student_layers else []

    def teacher_targets(self, teacher: nn.Module, batch: dict[str, Tensor], where: Tensor):
        """Everything the terms need from the teacher, computed once, without autograd."""
        terms = self.terms
        with torch.inference_mode():
            reps = forward_reps(
                teacher,
                batch["input_ids"],
                batch["attention_mask"],
                self.teacher_layers,
                **self._needs(),
            )
            logits = mlm_head(teacher)(reps.last[where]) if "logit" in terms else None
        # Inference tensors cannot be saved for backward; the losses need to save the targets.
        # Only what a term reads is copied.
        reads_last = {"hidden_cosine", "rkd_distance", "rkd_angle"} & set(terms)
        targets = Reps(
            last=_clone(reps.last) if reads_last else None,
            embedding=_clone(reps.embedding),
            hidden=[t.clone() for t in reps.hidden] if "hidden" in terms else [],
            scores=[t.clone() for t in reps.scores],
            ffn=[t.clone() for t in reps.ffn],
            last_scores=_clone(reps.last_scores),
            last_values=_clone(reps.last_values),
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
            **self._needs(),
        )
        mask = batch["attention_mask"]
        # Without padding the MSE terms need no selection: None lets them use one fused kernel.
        dense = None if bool(mask.all()) else mask
        out: dict[str, Tensor] = {}
        if "embedding" in self.terms:
            out["embedding"] = losses.hidden_mse(self.projections(s.embedding, 0), t.embedding, dense)
        if "hidden" in self.terms:
            out["hidden"] = sum(
                losses.hidden_mse(self.projections(h, i + 1), th, dense)
                for i, (h, th) in enumerate(zip(s.hidden, t.hidden, strict=True))
            )
        if "attention" in self.terms:
            probs = self.scheme.attention_target == "probs"
            out["attention"] = sum(
                losses.attention_mse(
                    attention_probs(a) if probs else a, attention_probs(ta) if probs else ta, dense
                )
                for a, ta in zip(s.scores, t.scores, strict=True)
            )
        if "logit" in self.terms:
            s_logits = mlm_head(self.student)(s.last[where])
            out["logit"] = losses.logit_kl(s_logits, t_logits, self.temperature)
        if "hidden_cosine" in self.terms:
            last = self.student.config.num_hidden_layers
            out["hidden_cosine"] = losses.hidden_cosine(
                self.projections(s.last, last), t.last, mask
            )
        if "minilm_attention" in self.terms:
            out["minilm_attention"] = losses.attention_kl(s.last_scores, t.last_scores, mask)
        if "minilm_value" in self.terms:
            out["minilm_value"] = losses.value_relation_kl(
                s.last_values, t.last_values, self.student.config.num_attention_heads, mask
            )
        if "rkd_distance" in self.terms or "rkd_angle" in self.terms:
            s_pool, t_pool = losses.mean_pool(s.last, mask), losses.mean_pool(t.last, mask)
            if "rkd_distance" in self.terms:
                out["rkd_distance"] = losses.rkd_distance(s_pool, t_pool)
            if "rkd_angle" in self.terms:
                out["rkd_angle"] = losses.rkd_angle(s_pool, t_pool)
        if "activation_boundary" in self.terms:
            out["activation_boundary"] = sum(
                losses.activation_boundary(
                    self.connectors[str(i)](f), tf, mask, self.scheme.ab_margin
                )
                for i, (f, tf) in enumerate(zip(s.ffn, t.ffn, strict=True), start=1)
            )
        return out

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        return sum(self.terms[name] * value for name, value in terms.items())
