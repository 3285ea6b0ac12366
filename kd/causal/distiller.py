"""One distillation forward for causal LMs: the logit arm and the multi arm's four terms.

The original study's multi arm, for decoder-only models: besides the next-token logit loss, the
student's embedding output, its blocks' outputs and their (causal) attention maps imitate the
teacher's at the mapped layers, through linear projections from the student's width to the
teacher's (TinyBERT's terms, Jiao et al. 2020; the attention term as MiniLM's KL, Wang et al.
2020, over the keys each query sees). The embedding and hidden terms are TinyBERT's MSE divided
by the teacher's mean square by default (:func:`relative_mse`: a decoder's residual stream is
not layer-normed), or plain. The representations are read with forward hooks on the models' own
modules — the embedding, each block, each block's attention — never with
``output_hidden_states``/``output_attentions``, which would keep every layer's tensors alive.
The attention maps come from the eager kernel (the fused ones never form them), so a model
distilled with an attention term runs eagerly.

The logit term is the chunked next-token loss (``kd.causal.chunked``) on the student's last
hidden state and LM head, against the online teacher's or against a top-k cache whose rows come
with the batch.

:class:`CausalDistiller` is the family's piece of the one training loop (kd/training/loop.py):
``forward(batch, teacher)`` returns the unweighted terms, ``total`` weighs them, as the MLM
family's :class:`kd.distill.distiller.Distiller` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kd.causal.cache import batch_support
from kd.causal.chunked import TeacherHead, chunked_next_token_loss
from kd.causal.divergences import divergence
from kd.core.params import CausalScheme
from kd.distill.losses import attention_kl, hidden_mse
from kd.distill.projections import Projections
from kd.models import parts

TERMS = ("logit", "hidden", "attention", "embedding")
CHUNK_SIZE = 256  # positions per block of the chunked logit term (its peak memory, not its value)


def relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """TinyBERT's hidden-state MSE (Jiao et al. 2020) divided by the teacher's mean square, per
    sequence, averaged over the batch:

        L = (1/B) Σ_b [ Σ_l ||s_bl − t_bl||² / Σ_l ||t_bl||² ]

    TinyBERT's MSE compares BERT's layer-normed states, of unit scale at every layer. A pre-norm
    decoder (Llama, Qwen, SmolLM) compares its residual stream, whose scale grows with depth
    (in SmolLM2-135M, from ~0.1 at the embedding to hundreds in the last blocks), so the plain
    MSE of the late layers outweighs everything else, the logit term included. Divided by the
    teacher's own mean square, every layer's term is scale-free: 0 is a match and 1 is as far
    as predicting zeros. The ratio is taken per sequence, so the loss of a batch is the mean of
    its rows' and does not depend on how the batch is split over processes or micro-batches.

    Args:
        student: [B, L, D], already projected to the teacher's width.
        teacher: [B, L, D].
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher states differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}; project the student first"
        )
    t = teacher.float()
    err = (student.float() - t).square().flatten(1).sum(-1)
    return (err / t.square().flatten(1).sum(-1).clamp_min(1e-12)).mean()


def layer_map(scheme: CausalScheme, kept: list[int] | None, n_student: int, n_teacher: int
              ) -> list[int]:  # fmt: skip
    """1-based teacher blocks the student's blocks imitate: the scheme's list; for ``auto``, the
    blocks a layer-subset student was cut from (``kept``, 1-based), else the uniform map
    ceil(i · Lt / Ls) of the MLM family."""
    if scheme.layer_map != "auto":
        return list(scheme.layer_map)
    if kept is not None:
        return list(kept)
    return [math.ceil(i * n_teacher / n_student) for i in range(1, n_student + 1)]


@contextmanager
def representations(model: nn.Module, attention: bool) -> Iterator[dict[str, Any]]:
    """Hooks that record, while in the block, the embedding output (``embedding``), every
    block's output (``blocks``, a list) and, if asked, every block's attention probabilities
    (``attention``, a list; the model must run the eager kernel)."""
    blocks = parts.blocks(model)
    embed = model.get_input_embeddings()
    got: dict[str, Any] = {"blocks": [None] * len(blocks), "attention": [None] * len(blocks)}
    handles = [embed.register_forward_hook(lambda m, a, out: got.__setitem__("embedding", out))]

    def keep(kind: str, i: int, pick: int | None):
        def hook(module, args, out):
            got[kind][i] = out[pick] if pick is not None and isinstance(out, tuple) else out

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(keep("blocks", i, 0)))
            if attention:
                handles.append(block.self_attn.register_forward_hook(keep("attention", i, 1)))
        yield got
    finally:
        for h in handles:
            h.remove()


class CausalDistiller(nn.Module):
    """The trainable part of a causal arm: the student and its projections to the teacher's
    width (for the embedding and hidden terms), identity-initialised between equal widths so a
    student cut from its teacher starts with zero representation loss.

    ``forward(batch, teacher)`` returns the scheme's active terms, unweighted; :meth:`total`
    weighs them. ``batch`` holds ``input_ids`` [B, L] of full blocks and, when the teacher
    cache stands in for the teacher's logits, its rows (``topk_ids``, ``topk_logprobs``,
    ``topk_rest``, from :meth:`kd.causal.cache.Cache.rows`); ``teacher`` is needed for the
    representation terms and whenever there is no cache.
    """

    # kd/training/dropout.py's CPU kernel is BERT's eager attention (no grouped-query heads);
    # the causal students keep their own.
    fast_dropout = False

    def __init__(self, student: nn.Module, teacher_width: int, scheme: CausalScheme,
                 layers: list[int], chunk_size: int = CHUNK_SIZE):  # fmt: skip
        super().__init__()
        self.student = student
        self.scheme = scheme
        self.layer_map = layers
        self.chunk_size = chunk_size
        self.terms = {t: scheme.terms[t] for t in TERMS if scheme.terms.get(t, 0) > 0}
        self.projections = None
        indices = ([0] if "embedding" in self.terms else []) + (
            list(range(1, len(layers) + 1)) if "hidden" in self.terms else [])  # fmt: skip
        if indices:
            self.projections = Projections(student.config.hidden_size, teacher_width,
                                           indices, identity=True)  # fmt: skip

    @property
    def eager_attention(self) -> bool:
        """Whether the models must run the eager attention kernel (the maps it forms)."""
        return "attention" in self.terms

    def extra_groups(self) -> dict[str, nn.Module]:
        return {} if self.projections is None else {"projections": self.projections}

    def set_progress(self, step: int, total_steps: int) -> None:
        """Causal schemes have no schedules: the weights and temperature stay as given."""

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        return sum(self.terms[name] * value for name, value in terms.items())

    def forward(self, batch: dict[str, Tensor], teacher: nn.Module | None) -> dict[str, Tensor]:
        scheme, input_ids, cache = self.scheme, batch["input_ids"], batch_support(batch)
        reps = scheme.uses_intermediate
        if teacher is None and (reps or cache is None):
            raise ValueError("the representation terms, and the logit term without a cache, "
                             "need the online teacher")  # fmt: skip
        attention = self.eager_attention  # the attention term, which reads the eager maps
        with representations(self.student, attention) as s:
            s_last = self.student.base_model(input_ids=input_ids).last_hidden_state
        t: dict[str, Any] = {}
        t_last = None
        if reps or cache is None:
            with torch.no_grad(), representations(teacher, attention) as t:
                t_last = teacher.base_model(input_ids=input_ids).last_hidden_state

        out: dict[str, Tensor] = {}
        if "logit" in self.terms:
            head = self.student.get_output_embeddings()
            t_head = None if teacher is None else teacher.get_output_embeddings()
            target = cache if cache is not None else TeacherHead(
                t_last[:, :-1].flatten(0, 1), t_head.weight, t_head.bias)  # fmt: skip
            div = divergence(scheme.divergence, beta=scheme.beta, alpha=scheme.alpha)
            out["logit"] = chunked_next_token_loss(
                s_last[:, :-1].flatten(0, 1), head.weight, target, div, scheme.temperature,
                bias=head.bias, chunk_size=self.chunk_size,
            )  # fmt: skip
        rep_loss = relative_mse if scheme.representation_loss == "relative_mse" else (
            lambda a, b: hidden_mse(a, b, None))  # fmt: skip
        if "embedding" in self.terms:
            out["embedding"] = rep_loss(self.projections(s["embedding"], 0), t["embedding"])
        if "hidden" in self.terms:
            pairs = [(self.projections(s["blocks"][i], i + 1), t["blocks"][j - 1])
                     for i, j in enumerate(self.layer_map)]  # fmt: skip
            out["hidden"] = torch.stack([rep_loss(a, b) for a, b in pairs]).mean()
        if attention:
            pairs = [(s["attention"][i], t["attention"][j - 1]) for i, j in enumerate(self.layer_map)]
            if any(a is None for pair in pairs for a in pair):
                raise ValueError("no attention maps were recorded: run both models with "
                                 "attn_implementation='eager'")  # fmt: skip
            out["attention"] = torch.stack(
                [attention_kl(a, b, causal=True, probs=True) for a, b in pairs]).mean()  # fmt: skip
        return out
