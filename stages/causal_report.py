"""causal_report: the causal experiment's report.md, its headline metrics
(data/metrics/causal.json, beside the MLM family's in `dvc exp show`), and the export: the
causal.scheme arm's student as a save_pretrained folder with its model card, registered in
MLflow."""

from __future__ import annotations

import pandas as pd

from kd.causal import outputs
from kd.core import cli, tracking
from kd.core.io import read_json, write_json
from kd.core.params import load_params
from kd.report import card, causal, registry, report


def main() -> None:
    p = load_params()
    with outputs.writing(outputs.folder(p, outputs.REPORT)) as tmp:
        arms = p.causal.arms
        names = [outputs.FLOOR, *arms]
        where = {n: outputs.need(outputs.evaluation(p, n), "causal_evaluate"
                                 + ("_init" if n == outputs.FLOOR else f"@{n}")) for n in names}
        evals = {n: read_json(where[n] / "eval.json") for n in names}
        batches = {n: pd.read_csv(where[n] / "test.csv")["kl_t1"].tolist() for n in names}
        trains = {a: read_json(outputs.need(outputs.arm(p, a), f"causal_train@{a}") / "train.json")
                  for a in arms}  # fmt: skip
        floor_texts = read_json(where[outputs.FLOOR] / "continuations.json")["text"]
        texts = {causal.TEACHER: floor_texts[causal.TEACHER],
                 outputs.FLOOR: floor_texts[outputs.FLOOR]}
        texts.update({a: read_json(where[a] / "continuations.json")["text"][a] for a in arms})
        teacher = read_json(outputs.folder(p, outputs.TEACHER) / "kd_teacher.json")
        student = read_json(outputs.folder(p, outputs.STUDENT_INIT) / "kd_student.json")
        tokens = read_json(outputs.folder(p, outputs.TOKENS) / "stats.json")
        info = {
            "teacher": f"{p.causal.teacher} ({teacher['class']}, "
                       f"{teacher['parameters'] / 1e6:.1f}M parameters, {teacher['layers']} blocks)",
            "student": f"{student['layers']} blocks, {student['parameters'] / 1e6:.1f}M parameters"
                       + (f", the teacher's blocks {student['kept_teacher_blocks']}"
                          if student["kept_teacher_blocks"] else ", random from a config"),
            "blocks": f"{tokens['train']['blocks']} train / {tokens['test']['blocks']} test "
                      f"blocks of {p.causal.block_size} tokens; teacher cache top-{p.causal.top_k}"
                      if p.causal.top_k else "no teacher cache",
        }  # fmt: skip
        schemes = {a: p.causal.schemes[a].terms for a in arms}
        compared = causal.comparisons(schemes, {a: batches[a] for a in arms}, trains)
        text = causal.markdown(info, evals, trains, compared, texts, p.causal.evaluate.prompts)
        (tmp / "report.md").write_text(text + "\n", encoding="utf-8")
        headline = causal.metrics(evals, trains)
        write_json(tmp / "comparison.json", {"metrics": headline, "compared": compared})
        # The seed it was made with: a row whose base.seed differs ran only the MLM pipeline.
        write_json(outputs.metrics(p), {**headline, "seed": p.base.seed})
        arm, dest = p.causal.headline, outputs.folder(p, outputs.DISTILLED)
        head = causal.headline(headline, arm)

        def model_card(model) -> str:
            return card.causal_card(
                head, p.causal.schemes[arm], p.causal.teacher, model.config.to_dict(),
                model.num_parameters(), student, trains[arm], tokens, p.causal.block_size,
            )  # fmt: skip

        with tracking.start_run("causal_report", tags={"kd.family": "causal"}) as run:
            run.log_metrics({f"{m}/{k}": v for m, d in headline.items() for k, v in d.items()
                             if isinstance(v, float | int)})  # fmt: skip
            run.log_artifact(tmp / "report.md")
            report.export(outputs.arm(p, arm), dest, model_card, "AutoModelForCausalLM",
                          (outputs.folder(p, outputs.STUDENT_INIT) / "kd_student.json",))
            version = registry.register(run, dest, head, registry.CAUSAL)
    print(text)
    print(f"headline {arm}: model in {dest}"
          + (f", registered in MLflow as {registry.CAUSAL.name} version {version}"
             if version else ""))


if __name__ == "__main__":
    cli.run(main)
