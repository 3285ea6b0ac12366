"""causal_tokenize: both splits by the teacher's and the student's tokenizer, checked equal,
joined with EOS and cut into full blocks."""

from __future__ import annotations

from datasets import DatasetDict
from transformers import AutoConfig, AutoTokenizer

from kd.causal import outputs
from kd.causal.tokens import build_split, vocabulary_problem
from kd.core import cli, runtime, tracking
from kd.core.io import need, write_json
from kd.core.params import load_params
from kd.data import corpus


def main() -> None:
    p = load_params()
    with outputs.writing(outputs.folder(p, outputs.TOKENS)) as tmp:
        runtime.configure()
        teacher = outputs.need(outputs.folder(p, outputs.TEACHER), "causal_teacher")
        student = outputs.need(outputs.folder(p, outputs.STUDENT_INIT), "causal_student")
        t_tok, s_tok = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
        for tok, where in ((t_tok, teacher), (s_tok, student)):
            problem = vocabulary_problem(tok, AutoConfig.from_pretrained(where))
            if problem:
                raise SystemExit(f"{where}: {problem}")
        caps = {"train": p.causal.train_blocks, "test": p.causal.test_blocks}
        dd = DatasetDict({
            split: build_split(corpus.read_split(need(p.paths.corpus / f"{split}.jsonl",
                                                      "sample_corpus")),
                               t_tok, s_tok, p.causal.block_size, cap,
                               key=f"causal.{split}_blocks")
            for split, cap in caps.items()
        })  # fmt: skip
        dd.save_to_disk(str(tmp))
        stats = {s: {"blocks": len(dd[s]), "tokens": len(dd[s]) * p.causal.block_size}
                 for s in dd}  # fmt: skip
        write_json(tmp / "stats.json", stats)
        with tracking.start_run("causal_tokenize", runtime=runtime.record(),
                                params={"block_size": p.causal.block_size, **caps}) as run:
            run.log_metrics({f"{s}.{k}": v for s in stats for k, v in stats[s].items()})
    print(f"causal tokens: {stats['train']['blocks']} train / {stats['test']['blocks']} test "
          f"blocks of {p.causal.block_size}")


if __name__ == "__main__":
    cli.run(main)
