"""Linear maps from the student's width to the teacher's, one per compared representation.

TinyBERT (Jiao et al. 2020) compares a narrower student's embedding output and layer outputs with
the teacher's through learned linear maps W with no activation (with a bias, as its
``fit_dense``). Both families use this one module: the MLM distiller for the embedding, hidden
and DistilBERT-cosine terms, the causal distiller for its embedding and hidden terms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Projections(nn.Module):
    """Linear maps keyed by student layer: index 0 is the embedding output, i the output of
    layer (block) i.

    Only the indices a scheme uses get a map (an unused map would hold parameters without
    gradients, which DDP rejects); with ``shared`` one map serves them all, as in TinyBERT's
    code. With ``identity``, maps between equal widths start as the identity, so a student cut
    from its teacher's own layers starts with zero representation loss.
    """

    def __init__(self, d_student: int, d_teacher: int, indices: list[int], shared: bool = False,
                 identity: bool = False):  # fmt: skip
        super().__init__()
        self.shared = shared
        keys = ["shared"] if shared else [str(i) for i in indices]
        self.maps = nn.ModuleDict({k: nn.Linear(d_student, d_teacher) for k in keys})
        if identity and d_student == d_teacher:
            with torch.no_grad():
                for m in self.maps.values():
                    m.weight.copy_(torch.eye(d_teacher))
                    m.bias.zero_()

    def forward(self, x: Tensor, index: int) -> Tensor:
        return self.maps["shared" if self.shared else str(index)](x)
