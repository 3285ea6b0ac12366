"""Model FLOPs of one distillation step, counted from shapes alone.

A matmul of an [m, k] by a [k, n] matrix costs 2·m·n·k FLOPs (one multiply and one add per
term). Only matmuls are counted: layer norms, softmax, GELU, embedding lookups, the losses and the
optimizer are O(tokens·width) and vanish next to them. Notation, for one encoder:

    B batch, L sequence length, T = B·L tokens, D hidden size, F intermediate size,
    N layers, V vocabulary, P positions where the prediction head runs.

Encoder forward (BERT, per layer, summed over N layers):

    Q, K, V and output projections   4 · 2·T·D·D = 8·T·D²
    scores Q·Kᵀ and mixing A·V       2 · 2·B·L·L·D = 4·B·L²·D    (all heads: H·(L·L·D/H))
    feed-forward D→F→D               2 · 2·T·D·F = 4·T·D·F

Masked-LM prediction head at P positions (BERT's ``cls``: a D×D transform, then the decoder):

    2·P·D² + 2·P·D·V

Distillation extras (this project's step, kd/distill/distiller.py):

    projections  student width → teacher width, per projected index   2·T·D_S·D_T
    recomputed attention scores from hooked Q, K, per mapped layer    2·B·L²·D
    (the naive way reads the model's own eager attention maps: no extra matmul)

A step is the teacher's forward (no backward) plus the student side's forward and backward,
the backward costing twice the forward (a gradient for the input and one for the weight of each
matmul):

    step = teacher_forward + 3 · (student_forward + projections + student_scores)

The head runs at the positions each implementation actually computes: the masked ones in this
project (P ≈ 15% of T), every position in the naive way (P = T).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kd.distill.distiller import logit_positions


@dataclass(frozen=True)
class Encoder:
    """The shapes of a BERT-style encoder with a masked-LM head."""

    layers: int  # N
    hidden: int  # D
    heads: int  # H (does not change the FLOPs: H heads of width D/H)
    intermediate: int  # F
    vocab: int  # V

    @classmethod
    def from_config(cls, config) -> Encoder:
        """From a HF ``BertConfig``-like object."""
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


def matmul(m: int, n: int, k: int) -> int:
    """FLOPs of an [m, k] @ [k, n] product: 2·m·n·k."""
    return 2 * m * n * k


def layer_forward(enc: Encoder, batch: int, seq: int) -> int:
    """One transformer layer: 8·T·D² + 4·B·L²·D + 4·T·D·F."""
    t, d = batch * seq, enc.hidden
    projections = 4 * matmul(t, d, d)
    attention = 2 * batch * matmul(seq, seq, d)  # Q·Kᵀ and A·V, all heads together
    ffn = matmul(t, enc.intermediate, d) + matmul(t, d, enc.intermediate)
    return projections + attention + ffn


def encoder_forward(enc: Encoder, batch: int, seq: int) -> int:
    """All N layers of the encoder, without the prediction head."""
    return enc.layers * layer_forward(enc, batch, seq)


def head_forward(enc: Encoder, positions: int) -> int:
    """The MLM head at ``positions`` positions: 2·P·D² + 2·P·D·V."""
    return matmul(positions, enc.hidden, enc.hidden) + matmul(positions, enc.vocab, enc.hidden)


def attention_scores(enc: Encoder, batch: int, seq: int) -> int:
    """Scores Q·Kᵀ recomputed for one layer from its hooked projections: 2·B·L²·D."""
    return batch * matmul(seq, seq, enc.hidden)


def step_flops(
    teacher: Encoder,
    student: Encoder,
    batch: int,
    seq: int,
    *,
    head_positions: int | None,
    projections: int = 0,
    teacher_score_layers: int = 0,
    student_score_layers: int = 0,
) -> dict[str, int]:
    """FLOPs of one training step, by part, and their ``total``.

    Args:
        teacher, student: encoder shapes.
        batch, seq: B and L of the step's batch.
        head_positions: P, the positions where both heads run; ``None`` when the step has no
            logit term (no head at all).
        projections: how many student→teacher linear maps the step applies (each to all T
            tokens).
        teacher_score_layers, student_score_layers: layers whose attention scores are
            recomputed from hooked Q and K (0 for the naive way).
    """
    t = batch * seq
    p = head_positions or 0
    parts = {
        "teacher_forward": encoder_forward(teacher, batch, seq),
        "teacher_head": head_forward(teacher, p) if head_positions is not None else 0,
        "teacher_scores": teacher_score_layers * attention_scores(teacher, batch, seq),
        "student_forward": encoder_forward(student, batch, seq),
        "student_head": head_forward(student, p) if head_positions is not None else 0,
        "student_scores": student_score_layers * attention_scores(student, batch, seq),
        "projections": projections * matmul(t, teacher.hidden, student.hidden),
    }
    student_side = parts["student_forward"] + parts["student_head"] + parts["student_scores"]
    student_side += parts["projections"]
    parts["student_backward"] = 2 * student_side
    parts["total"] = (
        parts["teacher_forward"] + parts["teacher_head"] + parts["teacher_scores"] + 3 * student_side
    )
    return parts


def describe(enc: Encoder) -> dict[str, int]:
    return asdict(enc)


class StepFlops:
    """The model FLOPs of one of this project's training steps for a distiller, per batch.

    The heads run at the positions the scheme's logit term scores (the masked ones by default;
    their count varies with the draw), the projections on every token, and the attention term
    recomputes scores from hooked Q and K in each mapped layer (kd/distill/distiller.py).
    """

    def __init__(self, distiller, teacher_config):
        terms, scheme = distiller.terms, distiller.scheme
        self.teacher = Encoder.from_config(teacher_config)
        self.student = Encoder.from_config(distiller.student.config)
        self.where = scheme.logit_positions if "logit" in terms else None
        n_proj = len(distiller.projections.maps) if distiller.projections is not None else 0
        if scheme.projection == "shared" and distiller.projections is not None:
            # One map applied once per projected index.
            n_proj = ("embedding" in terms) + (len(distiller.layer_map) if "hidden" in terms else 0)
        self.projections = n_proj
        self.score_layers = len(distiller.layer_map) if "attention" in terms else 0

    def positions(self, batch: dict) -> int | None:
        """How many positions the heads score in ``batch``; None when there is no logit term."""
        return None if self.where is None else int(logit_positions(batch, self.where).sum())

    def parts(self, batch_size: int, seq_len: int, positions: int | None,
              recomputed_scores: bool = True) -> dict[str, int]:
        """:func:`step_flops` by part; ``recomputed_scores`` False for a way that reads the
        models' own attention maps (the benchmark's naive row)."""
        scores = self.score_layers if recomputed_scores else 0
        return step_flops(
            self.teacher, self.student, batch_size, seq_len, head_positions=positions,
            projections=self.projections, teacher_score_layers=scores,
            student_score_layers=scores,
        )

    def __call__(self, batch: dict) -> int:
        """Total FLOPs of a step on ``batch`` (``input_ids`` [B, L], ``labels``)."""
        b, length = batch["input_ids"].shape
        return self.parts(b, length, self.positions(batch))["total"]
