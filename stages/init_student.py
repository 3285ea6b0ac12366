"""init_student: build the student once, seeded; both arms start from exactly these weights."""

from __future__ import annotations

from kd.core import cli, runtime, tracking
from kd.core.io import atomic_dir, write_json
from kd.core.params import load_params
from kd.data import assets
from kd.models import student


def main() -> None:
    p = load_params()
    runtime.configure()  # built on the CPU, seeded inside student.build
    rt = runtime.record()
    _, student_tok = assets.tokenizers(p)
    teacher_tok = assets.load_tokenizer(p.tokenize.teacher_tokenizer or p.teacher.source)
    with tracking.start_run("init_student", params=p.student.model_dump(), runtime=rt) as run:
        model = student.build(p.student, len(teacher_tok), p.tokenize.max_seq_length, p.base.seed)
        digest = student.weights_hash(model)
        with atomic_dir(p.paths.student_init) as tmp:
            model.save_pretrained(tmp)
            student_tok.save_pretrained(tmp)
        info = {"params": student.n_params(model), "weights_sha256": digest, "runtime": rt}
        write_json(p.paths.metrics / "student_init.json", info)
        run.log_metrics({"params": info["params"]})
        run.set_tags({"kd.student_init_sha256": digest})
    print(f"student: {info['params'] / 1e6:.1f}M parameters, sha256 {digest[:12]}")


if __name__ == "__main__":
    cli.run(main)
