"""report: the headline metrics, the comparison, the figures and report.md, and the export."""

from __future__ import annotations

import math

from kd.core import arms as kd_arms
from kd.core import cli, runtime, tracking
from kd.core.io import atomic_dir, need, read_json, write_json
from kd.core.params import load_params
from kd.report import card, registry, report


def main() -> None:
    p = load_params()
    runtime.configure()
    compared, floor_out = kd_arms.compared(p), kd_arms.of_floor(p)
    arms = [report.load_arm(o, p.loss.schemes[o.name]) for o in compared]
    floor = report.load_arm(floor_out, None) if floor_out.eval_json.exists() else None
    headline = p.loss.scheme
    summary = report.comparison(arms, headline, floor)
    probes = {
        kd_arms.TEACHER: kd_arms.teacher_probe_json(p),
        kd_arms.FLOOR: floor_out.probe_json,
        **{o.name: o.probe_json for o in compared},
    }
    probed = report.read_probes(probes)
    probe_keys, probe_md = report.probe_results(
        probed,
        [a.name for a in arms],
        headline,
        kd_arms.FLOOR,
    )
    summary.update(probe_keys)
    headline_arm = next(a for a in arms if a.name == headline)
    head = report.headline_metrics(summary, headline_arm)
    corpus = read_json(need(p.paths.metrics / "corpus.json", "sample_corpus"))
    probe_dataset = probed and (f"{probed['dataset']} ({probed['n_classes']} classes, "
                                f"{probed['n_test']} held-out texts)")

    def model_card(model) -> str:
        return card.model_card(
            head, p.loss.schemes[headline], p.teacher.source, model.config.to_dict(),
            sum(t.numel() for t in model.parameters()), headline_arm.train, corpus,
            probe_dataset,
        )

    with tracking.start_run(
        "report", params={"loss.scheme": headline, "loss.arms": ",".join(p.loss.arms)},
        runtime=runtime.record(),
    ) as run:
        with atomic_dir(p.paths.report) as tmp:
            figs = report.figures(arms, tmp)
            md = report.markdown(arms, headline, figs, floor)
            (tmp / "report.md").write_text(md + "\n".join(probe_md))
        report.export(kd_arms.headline(p).student, p.paths.distilled, model_card)
        version = registry.register(run, p.paths.distilled, head)
        write_json(p.paths.metrics / "comparison.json", summary)
        # The seed it was made with: a row of `dvc exp show` whose base.seed differs ran only
        # the causal pipeline, and kd.report.seeds must not count these numbers for its seed.
        write_json(p.paths.metrics / "eval.json", {**head, "seed": p.base.seed})
        run.log_metrics(
            {
                k: float(v)
                for k, v in summary.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
        )
        run.log_artifacts(p.paths.report, "report")
    print(
        f"headline {headline}: test logit KL {report.fmt(head['test/logit_kl_t1'])}; "
        f"report in {p.paths.report / 'report.md'}, model in {p.paths.distilled}"
        + (f", registered in MLflow as {registry.NAME} version {version}" if version else "")
    )


if __name__ == "__main__":
    cli.run(main)
