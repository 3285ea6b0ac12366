"""`python -m kd.preflight`: the check_params stage, first in every `dvc repro`.

DVC deletes a stage's outputs just before running it, so a stage that discovered bad params
itself would already have lost its previous outputs. This runs before every other stage: it
validates params.yaml (kd/core/params.py) and what params alone cannot show — each trained scheme's
layer map and head counts against the teacher's and student's configs (read, not loaded).
It writes a marker with constant content that every stage depends on, so a bad params.yaml
stops the pipeline with nothing deleted, while a good change reruns only the stages that use it.
"""

from __future__ import annotations

from transformers import AutoConfig, BertConfig

from kd.core.params import Params, load_params
from kd.data.assets import resolve_model
from kd.distill.distiller import check_compatible


def student_config(p: Params):
    if p.student.checkpoint:
        return AutoConfig.from_pretrained(resolve_model(p.student.checkpoint))
    return BertConfig(
        hidden_size=p.student.hidden_size,
        num_hidden_layers=p.student.num_hidden_layers,
        num_attention_heads=p.student.num_attention_heads,
        intermediate_size=p.student.intermediate_size,
    )


def check(p: Params) -> None:
    teacher = AutoConfig.from_pretrained(resolve_model(p.teacher.source))
    student = student_config(p)
    for arm in p.loss.trained:
        try:
            check_compatible(student, teacher, p.loss.schemes[arm])
        except SystemExit as err:
            raise SystemExit(f"loss.schemes.{arm}: {err}") from None


def main() -> None:
    p = load_params()
    check(p)
    p.paths.params_ok.parent.mkdir(parents=True, exist_ok=True)
    p.paths.params_ok.write_text("params.yaml is valid\n")


if __name__ == "__main__":
    main()
