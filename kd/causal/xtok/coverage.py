"""How much of the teacher's cached probability mass a vocabulary map carries to the student.

Shares are means over positions of the mass on the cached top-k, split by the rule that mapped
each token (exact / prefix / leftover), plus the **rest bin** — the teacher mass outside its
top-k. The rest is counted as *not covered*: the cache does not say which tokens it holds, so
nothing can be claimed about how they map, and the losses can only put it in the extra bin with
the leftover mass. Hence exact + prefix + leftover + rest = 1 at each position, and ``covered``
(exact + prefix) is a lower bound on what a full-vocabulary projection would keep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kd.causal.divergences import TopK
from kd.causal.xtok.vocab_map import CLASSES, LEFTOVER, PREFIX, RULES, VocabMap


@dataclass(frozen=True)
class Coverage:
    """Mean per-position shares of the teacher's mass; ``by_class`` the same split per teacher
    token class (``mass`` the class's share of all mass, ``covered`` the share of *that class's*
    mass that maps, None where the class has none); ``worst_leftover`` / ``worst_prefix`` the
    teacher tokens carrying the most mass through that rule."""

    positions: int
    exact: float
    prefix: float
    leftover: float
    rest: float
    covered: float
    by_class: dict[str, dict[str, float | None]]
    worst_leftover: list[dict]
    worst_prefix: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def _shown(piece) -> str:
    return piece if isinstance(piece, str) else piece.decode("utf-8", errors="backslashreplace")


def coverage(vmap: VocabMap, topk: TopK, worst: int = 10) -> Coverage:
    """The coverage report of ``vmap`` on the cached ``topk`` ([N, k] teacher ids)."""
    n = topk.ids.shape[0]
    if n == 0:
        raise ValueError("coverage needs at least one position")
    ids = topk.ids.cpu()
    p = topk.logprobs.detach().cpu().double().exp()
    rule = vmap.rule[ids]
    cls = vmap.token_class[ids]

    def share(mask: torch.Tensor) -> float:
        return float((p * mask).sum() / n)

    by_rule = {name: share(rule == r) for r, name in enumerate(RULES)}
    rest = 0.0 if topk.rest is None else float(topk.rest.detach().cpu().double().exp().mean())
    by_class = {}
    for c, name in enumerate(CLASSES):
        in_c = cls == c
        mass = share(in_c)
        split = {r: share(in_c & (rule == i)) for i, r in enumerate(RULES)}
        covered = split["exact"] + split["prefix"]
        by_class[name] = {"mass": mass, **split, "covered": covered / mass if mass > 0 else None}

    def worst_by(r: int) -> list[dict]:
        mask = rule == r
        per_id = torch.bincount(ids[mask], weights=p[mask], minlength=len(vmap.teacher_pieces)) / n
        top = per_id.topk(min(worst, int((per_id > 0).sum())))
        return [
            {
                "id": int(i),
                "token": _shown(vmap.teacher_pieces[int(i)]),
                "class": CLASSES[int(vmap.token_class[int(i)])],
                "mass": float(m),
            }
            for m, i in zip(top.values, top.indices, strict=True)
        ]

    return Coverage(
        positions=n,
        exact=by_rule["exact"],
        prefix=by_rule["prefix"],
        leftover=by_rule["leftover"],
        rest=rest,
        covered=by_rule["exact"] + by_rule["prefix"],
        by_class=by_class,
        worst_leftover=worst_by(LEFTOVER),
        worst_prefix=worst_by(PREFIX),
    )
