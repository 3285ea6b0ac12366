"""Next-token distillation losses a block of positions at a time.

The unchunked loss materialises the student's logits for every position, [N, V] — at 8,192
positions and SmolLM2's 49,152 words that is 1.6 GB in float32, and autograd keeps several such
tensors (logits, log-softmax, probabilities, the teacher's) until the backward pass. Here the
loss starts from the student's last hidden states [N, H] and its output head [V, H]: each block
of ``chunk_size`` positions gets its logits, its share of the loss and — right away, inside the
forward pass — its gradients with respect to the hidden states and the head, after which the
block's logits are freed. Peak memory is then O(chunk_size · V) instead of O(N · V); the backward
pass only scales the stored gradients. (The same idea as Liger-Kernel's fused linear
distillation losses, written here for any divergence of ``kd.causal.divergences``.)

The value and gradients equal :func:`kd.causal.divergences.next_token_loss` on the full logits
(``tests/test_causal_losses.py`` checks it to 1e-6); ``python -m kd.bench.chunked_loss`` measures
the memory and time it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kd.causal.divergences import Divergence, TopK, check_temperature, per_position


@dataclass(frozen=True)
class TeacherHead:
    """The teacher's last hidden states [N, H_t] and output head [V, H_t] (+ bias [V]): its
    logits are made a block at a time too, without gradient."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def __getitem__(self, rows: slice) -> Tensor:
        with torch.no_grad():
            return torch.nn.functional.linear(self.hidden[rows], self.weight, self.bias)


# The teacher's side of a block: logits [N, V], a head that makes them, or a top-k support.
Teacher = Tensor | TeacherHead | TopK


def _block(teacher: Teacher, rows: slice) -> Tensor | TopK:
    return teacher[rows].detach() if isinstance(teacher, Tensor) else teacher[rows]


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, div, temperature, chunk_size):
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden, dtype=dtype)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if weight.requires_grad else None
        grad_bias = (
            torch.zeros_like(bias, dtype=dtype) if bias is not None and bias.requires_grad else None
        )
        scale = temperature**2 / n
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(True)
                w = weight.detach().requires_grad_(grad_weight is not None)
                b = None if bias is None else bias.detach().requires_grad_(grad_bias is not None)
                logits = torch.nn.functional.linear(h, w, b)
                loss = per_position(logits, _block(teacher, rows), div, temperature).sum() * scale
                wrt = [h] + [t for t in (w, b) if t is not None and t.requires_grad]
                grads = torch.autograd.grad(loss, wrt)
            total += loss.detach()
            grad_hidden[rows] = grads[0]
            rest = list(grads[1:])
            if grad_weight is not None:
                grad_weight += rest.pop(0)
            if grad_bias is not None:
                grad_bias += rest.pop(0)
            del logits, loss, grads  # the block's [chunk, V] tensors go before the next block
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        # Only the inputs' dtypes are kept, to cast the gradients back to them.
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors

        grads = [
            None if g is None else (g * grad_out).to(dtype)
            for g, dtype in zip((grad_hidden, grad_weight, grad_bias), ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None)


def chunked_next_token_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher: Teacher,
    div: Divergence,
    temperature: float = 1.0,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """T² · (1/N) · Σ_n D(p_n, q_n) with q_n = softmax((hidden_n · weightᵀ + bias) / T).

    Args:
        hidden: [N, H] the student's last hidden states at the N positions that count.
        weight: [V, H] the student's output head (its LM head, often tied to the embeddings).
        teacher: the teacher's logits [N, V], a :class:`TeacherHead`, or a top-k support.
        div: a divergence of ``kd.causal.divergences``.
        temperature: T > 0.
        bias: [V] the head's bias, if it has one.
        chunk_size: positions per block: peak memory ∝ chunk_size · V.
    """
    check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.shape[0] == 0:
        raise ValueError("no positions to distil on")
    return _Chunked.apply(hidden, weight, bias, teacher, div, temperature, chunk_size)
