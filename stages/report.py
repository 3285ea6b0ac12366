"""report: the headline metrics, the figures and report.md, and the distilled model's export."""

from __future__ import annotations

import math

from kd import report, tracking
from kd.io import atomic_dir, write_json
from kd.params import load_params


def main() -> None:
    p = load_params()
    metrics, plots = p.paths.metrics, p.paths.plots
    arms = [report.load_arm(a, p.loss.schemes[a], metrics, plots) for a in p.loss.arms]
    floor = None
    if (metrics / f"eval_{report.FLOOR}.json").exists():
        floor = report.load_arm(report.FLOOR, None, metrics, plots)
    headline = p.loss.scheme
    summary = report.eval_metrics(arms, headline, floor)

    with tracking.start_run(
        "report", params={"loss.scheme": headline, "loss.arms": ",".join(p.loss.arms)}
    ) as run:
        with atomic_dir(p.paths.report) as tmp:
            figs = report.figures(arms, tmp)
            (tmp / "report.md").write_text(report.markdown(arms, headline, figs, floor))
        report.export(p.paths.students / headline, p.paths.distilled)
        write_json(metrics / "eval.json", summary)
        run.log_metrics(
            {
                k: float(v)
                for k, v in summary.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
        )
        run.log_artifacts(p.paths.report, "report")
    print(
        f"headline {headline}: test logit KL {report.fmt(summary['test/logit_kl'])}; "
        f"report in {p.paths.report / 'report.md'}, model in {p.paths.distilled}"
    )


if __name__ == "__main__":
    main()
