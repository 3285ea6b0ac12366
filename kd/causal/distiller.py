"""One distillation forward for causal LMs: the logit arm and the multi arm's four terms.

The seed's multi arm, for decoder-only models: besides the next-token logit loss, the student's
embedding output, its blocks' outputs and their (causal) attention maps imitate the teacher's at
the mapped layers, through linear projections from the student's width to the teacher's
(TinyBERT's terms, Jiao et al. 2020; the attention term as MiniLM's KL, Wang et al. 2020).
The embedding and hidden terms are TinyBERT's MSE divided by the teacher's mean square by
default (:func:`relative_mse`: a decoder's residual stream is not layer-normed), or plain. The
representations are read with forward hooks on the models' own modules — the embedding, each
block, each block's attention — never with ``output_hidden_states``/``output_attentions``, which
would keep every layer's tensors alive. The attention maps come from the eager kernel (the fused
ones never form them), so a model distilled with an attention term runs eagerly.

The logit term is the chunked next-token loss (``kd.causal.chunked``) on the student's last
hidden state and LM head, against the online teacher's or against a top-k cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kd.causal.chunked import TeacherHead, chunked_next_token_loss
from kd.causal.divergences import TopK, divergence
from kd.causal.students import blocks_path
from kd.distill.losses import hidden_mse

TERMS = ("logit", "hidden", "attention", "embedding")


def causal_attention_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """MiniLM's attention transfer (Wang et al. 2020) on causal attention probabilities:

        L = (1/(B · H · L)) Σ_{b,h,i} Σ_{j ≤ i} A^T_bhij · log(A^T_bhij / A^S_bhij)

    Args:
        student: [B, H, L, L] attention probabilities (rows sum to 1 over keys j ≤ i).
        teacher: [B, H, L, L] the teacher's, with the same number of heads.

    Future keys (j > i) hold 0 in both and are left out; every row has at least its own key.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher attention maps differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)} (the multi arm's attention term needs equal head counts)"
        )
    length = student.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=student.device).tril()
    tiny = torch.finfo(torch.float32).tiny
    t = teacher.float()
    # clamp, not +eps: below the diagonal the probabilities are > 0 and stay exact; the clamp
    # only meets the zeros above it, which the where() then drops (their gradient is 0).
    log_t, log_s = t.clamp_min(tiny).log(), student.float().clamp_min(tiny).log()
    return torch.where(causal, t * (log_t - log_s), 0.0).sum(-1).mean()


def relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """TinyBERT's hidden-state MSE (Jiao et al. 2020) divided by the teacher's mean square:

        L = Σ_{b,l} ||s_bl − t_bl||² / Σ_{b,l} ||t_bl||²

    TinyBERT's MSE compares BERT's layer-normed states, of unit scale at every layer. A pre-norm
    decoder (Llama, Qwen, SmolLM) compares its residual stream, whose scale grows with depth
    (in SmolLM2-135M, from ~0.1 at the embedding to hundreds in the last blocks), so the plain
    MSE of the late layers outweighs everything else, the logit term included. Divided by the
    teacher's own mean square, every layer's term is scale-free: 0 is a match and 1 is as far
    as predicting zeros.

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
    return (student.float() - t).square().sum() / t.square().sum().clamp_min(1e-12)


@dataclass(frozen=True)
class Scheme:
    """The weights of the four terms (0 leaves a term out), and the logit term's settings."""

    logit: float = 1.0
    hidden: float = 0.0
    attention: float = 0.0
    embedding: float = 0.0
    divergence: str = "forward_kl"
    beta: float = 0.5  # jsd's mixture weight
    alpha: float = 0.1  # the skew KLs' skew
    temperature: float = 1.0
    chunk_size: int = 256
    representation_loss: str = "relative_mse"  # "relative_mse" | "mse" (TinyBERT's, unscaled)

    def needs_representations(self) -> bool:
        return any(getattr(self, t) > 0 for t in TERMS[1:])


class Projections(nn.Module):
    """One linear map per compared representation (the embedding, then each student block) from
    the student's width to the teacher's; identity-initialised when the widths are equal, so a
    student cut from its teacher starts with zero representation loss."""

    def __init__(self, student_width: int, teacher_width: int, count: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(count))
        if student_width == teacher_width:
            with torch.no_grad():
                for m in self.maps:
                    m.weight.copy_(torch.eye(teacher_width))
                    m.bias.zero_()

    def forward(self, index: int, x: Tensor) -> Tensor:
        return self.maps[index](x)


@contextmanager
def representations(model: nn.Module, attention: bool) -> Iterator[dict[str, Any]]:
    """Hooks that record, while in the block, the embedding output (``embedding``), every
    block's output (``blocks``, a list) and, if asked, every block's attention probabilities
    (``attention``, a list; the model must run the eager kernel)."""
    path = blocks_path(model)
    blocks = model.get_submodule(path)
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


def base_model(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (``model.model`` for Llama-likes)."""
    return model.get_submodule(blocks_path(model).rsplit(".", 1)[0])


def terms(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: Tensor,
    scheme: Scheme,
    layer_map: list[int] | None = None,
    projections: Projections | None = None,
    cache: TopK | None = None,
) -> dict[str, Tensor]:
    """The scheme's terms and their weighted ``total`` on one batch of full blocks [B, L].

    ``layer_map[i]`` is the 1-based teacher block that student block i + 1 imitates (layer 0,
    the embedding output, pairs with the teacher's); ``cache`` the teacher's top-k support at
    the batch's B · (L − 1) predicting positions, used for the logit term instead of the
    online teacher (which is then needed only for the representation terms).
    """
    reps = scheme.needs_representations()
    if reps and (layer_map is None or projections is None or teacher is None):
        raise ValueError(
            "the hidden, attention and embedding terms need a teacher, a layer map and projections"
        )
    if teacher is None and cache is None:
        raise ValueError("the logit term needs the teacher or its cache")
    with representations(student, scheme.attention > 0) as s:
        s_last = base_model(student)(input_ids=input_ids).last_hidden_state
    t: dict[str, Any] = {}
    t_last = None
    if reps or cache is None:
        with torch.no_grad(), representations(teacher, scheme.attention > 0) as t:
            t_last = base_model(teacher)(input_ids=input_ids).last_hidden_state

    out: dict[str, Tensor] = {}
    head = student.get_output_embeddings()
    if scheme.logit > 0:
        hidden = s_last[:, :-1].flatten(0, 1)
        target = cache if cache is not None else TeacherHead(
            t_last[:, :-1].flatten(0, 1), teacher.get_output_embeddings().weight,
            teacher.get_output_embeddings().bias,
        )  # fmt: skip
        div = divergence(scheme.divergence, beta=scheme.beta, alpha=scheme.alpha)
        out["logit"] = chunked_next_token_loss(
            hidden, head.weight, target, div, scheme.temperature, bias=head.bias,
            chunk_size=scheme.chunk_size,
        )  # fmt: skip
    if scheme.representation_loss not in ("relative_mse", "mse"):
        raise ValueError(f"unknown representation loss {scheme.representation_loss!r}")
    rep_loss = relative_mse if scheme.representation_loss == "relative_mse" else (
        lambda a, b: hidden_mse(a, b, None))  # fmt: skip
    if scheme.embedding > 0:
        out["embedding"] = rep_loss(projections(0, s["embedding"]), t["embedding"])
    if scheme.hidden > 0:
        pairs = [
            (projections(i + 1, s["blocks"][i]), t["blocks"][j - 1])
            for i, j in enumerate(layer_map)
        ]
        out["hidden"] = torch.stack([rep_loss(a, b) for a, b in pairs]).mean()
    if scheme.attention > 0:
        pairs = [(s["attention"][i], t["attention"][j - 1]) for i, j in enumerate(layer_map)]
        if any(a is None for pair in pairs for a in pair):
            raise ValueError(
                "no attention maps were recorded: run both models with attn_implementation='eager'"
            )
        out["attention"] = torch.stack([causal_attention_kl(a, b) for a, b in pairs]).mean()
    out["total"] = sum(getattr(scheme, name) * value for name, value in out.items())
    return out
