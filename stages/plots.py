"""plots (and causal_plots, with --causal): every arm's curves for `dvc plots show` / `diff`, one
long CSV per chart (kd/report/curves.py), for the arms the params list now."""

from __future__ import annotations

import argparse

from kd.causal import outputs
from kd.core import cli
from kd.core.params import load_params
from kd.report import curves


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--causal", action="store_true", help="the causal pipeline's arms")
    causal = ap.parse_args(argv).causal
    p = load_params()
    if causal:
        arms, out = p.causal.arms, outputs.folder(p, "plots")
        sources = {"train": {a: outputs.arm(p, a) / "train.csv" for a in arms},
                   "test": {a: outputs.evaluation(p, a) / "test.csv" for a in arms}}
    else:
        arms, out = p.loss.arms, p.paths.plots
        sources = {"train": {a: p.paths.train / f"{a}.csv" for a in arms},
                   "eval_train": {a: p.paths.eval / f"{a}_train.csv" for a in arms},
                   "eval_test": {a: p.paths.eval / f"{a}_test.csv" for a in arms}}
    curves.write(sources, out)
    print(f"plots: {', '.join(arms)} -> {out}")


if __name__ == "__main__":
    cli.run(main)
