"""What `dvc plots` draws: each arm's per-step (or per-batch) CSV, stacked into one long CSV per
chart with an ``arm`` column, which kd/report/arms.vega.json colours by.

DVC's plot definitions name their files one by one, so a chart over "every arm in loss.arms"
cannot be written in dvc.yaml; one file holding every arm can. The stage that writes it (plots,
causal_plots) declares the arm list as a param and its folder as its output, so a third arm
appears and a removed one disappears without editing dvc.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from kd.core.io import atomic_file


def stack(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The arms' rows one after another, each tagged with its arm (first column); columns that
    only some arms have (the multi arm's extra terms) are empty for the others."""
    return pd.concat([f.assign(arm=arm)[["arm", *f.columns]] for arm, f in frames.items()],
                     ignore_index=True)  # fmt: skip


def write(sources: Mapping[str, Mapping[str, Path]], out: Path) -> None:
    """``sources[chart][arm]`` is that arm's CSV; writes ``out/<chart>.csv`` for each chart."""
    out.mkdir(parents=True, exist_ok=True)
    for chart, by_arm in sources.items():
        missing = [str(p) for p in by_arm.values() if not p.exists()]
        if missing:
            raise SystemExit(f"{', '.join(missing)} missing: run the pipeline's train and "
                             "evaluate stages first (`dvc repro`)")
        with atomic_file(out / f"{chart}.csv") as f:
            stack({arm: pd.read_csv(p) for arm, p in by_arm.items()}).to_csv(f, index=False)
