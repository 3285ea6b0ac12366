"""Least-squares linear maps student → teacher, fitted in a stream of batches.

Judging how much of the teacher an intermediate student representation holds needs a map from
the student's width to the teacher's. A learned projection exists only for arms trained with
one, so the evaluation fits its own for every arm, the same way: ordinary least squares with a
bias,

    (W, b) = argmin Σ_n ||x_n W + b − y_n||²,

over real tokens. The sums it needs (means and centred cross-products) are accumulated in float64
batch by batch, so memory does not grow with the number of fitting batches; the centred normal
equations are solved with ``torch.linalg.lstsq`` (SVD driver), which also copes with the exact rank
deficiency of LayerNorm outputs (their features sum to a constant per token).
"""

from __future__ import annotations

import torch
from torch import Tensor


class LinearFit:
    """Accumulates ``x`` [N, Dx] → ``y`` [N, Dy] pairs; :meth:`solve` returns ``(W, b)``."""

    def __init__(self) -> None:
        self.n = 0
        self._sx: Tensor | None = None
        self._sy: Tensor | None = None
        self._sxx: Tensor | None = None
        self._sxy: Tensor | None = None

    def update(self, x: Tensor, y: Tensor) -> None:
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"expected x [N, Dx] and y [N, Dy] with the same N, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            return
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        if self._sx is None:
            self._sx, self._sy = x.new_zeros(x.shape[1]), y.new_zeros(y.shape[1])
            self._sxx = x.new_zeros(x.shape[1], x.shape[1])
            self._sxy = x.new_zeros(x.shape[1], y.shape[1])
        self.n += x.shape[0]
        self._sx += x.sum(0)
        self._sy += y.sum(0)
        self._sxx += x.T @ x
        self._sxy += x.T @ y

    def solve(self) -> tuple[Tensor, Tensor]:
        """float32 ``W`` [Dx, Dy] and ``b`` [Dy] of the least-squares fit with a bias column."""
        if self.n == 0:
            raise ValueError("no data to fit: every fitting batch was empty")
        mx, my = self._sx / self.n, self._sy / self.n
        # Centring eliminates the bias column: the normal equations of [x 1] reduce to these.
        cxx = self._sxx - self.n * torch.outer(mx, mx)
        cxy = self._sxy - self.n * torch.outer(mx, my)
        # Relative cut-off for the SVD: directions the data do not span get no weight, instead of
        # a huge one fitted to rounding noise.
        rcond = 1e-10
        w = torch.linalg.lstsq(cxx, cxy, rcond=rcond, driver="gelsd").solution
        b = my - mx @ w
        return w.float(), b.float()


def apply(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``x W + b`` in float32, for [..., Dx] inputs."""
    return x.float() @ w.to(x.device) + b.to(x.device)
