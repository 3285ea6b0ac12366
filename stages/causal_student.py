"""causal_student: the initial causal student, built once; both arms load exactly these weights."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.causal import outputs, students
from kd.core import cli, runtime, tracking
from kd.core.io import write_json
from kd.core.params import load_params
from kd.models.student import n_params, weights_hash


def main() -> None:
    p = load_params()
    with outputs.writing(outputs.folder(p, outputs.STUDENT_INIT)) as tmp:
        runtime.configure(p.base.threads)
        where = outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")
        teacher = AutoModelForCausalLM.from_pretrained(where)
        cfg = p.causal.student
        kept = None
        if cfg.layers is not None:
            n = teacher.config.num_hidden_layers
            picked = (students.uniform_layers(n, cfg.layers) if isinstance(cfg.layers, int)
                      else [b - 1 for b in cfg.layers])  # fmt: skip
            student = students.from_teacher_layers(teacher, picked)
            kept = [i + 1 for i in picked]
        else:
            student = students.from_config(teacher, p.base.seed, **cfg.config)
        student.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(where).save_pretrained(tmp)
        # A layer-subset student is the same for every seed: recording none keeps this output,
        # and so the tokens and the teacher cache below it, unchanged across seeds.
        seed = p.base.seed if kept is None else None
        info = {"kept_teacher_blocks": kept, "config": cfg.config, "seed": seed,
                "parameters": n_params(student), "teacher_parameters": n_params(teacher),
                "layers": student.config.num_hidden_layers,
                "weights_sha256": weights_hash(student)}  # fmt: skip
        write_json(tmp / "kd_student.json", info)
        with tracking.start_run("causal_student", params={"student": cfg.model_dump()},
                                runtime=runtime.record()) as run:  # fmt: skip
            run.log_metrics({"parameters": info["parameters"]})
    print(f"causal student: {info['layers']} blocks, {info['parameters'] / 1e6:.1f}M parameters"
          + (f" (teacher blocks {kept})" if kept else ""))


if __name__ == "__main__":
    cli.run(main)
