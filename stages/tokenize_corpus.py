"""tokenize: both tokenizers on both splits, checked equal, packed, with fixed MLM masks."""

from __future__ import annotations

from kd.core import cli, runtime, tracking
from kd.core.io import atomic_dir, need, write_json
from kd.core.params import load_params
from kd.data import assets, corpus, tokens


def main() -> None:
    p = load_params()
    # No device and no global seed: the masks come from their own generators (tokenize.mask_seed).
    runtime.configure()
    rt = runtime.record()
    teacher_tok, student_tok = assets.tokenizers(p)
    splits = {s: corpus.read_split(need(p.paths.corpus / f"{s}.jsonl", "sample_corpus"))
              for s in ("train", "test")}
    with tracking.start_run("tokenize", params=p.tokenize.model_dump(), runtime=rt) as run:
        dd = tokens.build(
            splits,
            teacher_tok,
            student_tok,
            p.tokenize.max_seq_length,
            p.tokenize.mlm_probability,
            p.tokenize.mask_seed,
            p.tokenize.num_proc,
        )
        with atomic_dir(p.paths.tokens) as tmp:
            dd.save_to_disk(str(tmp))
        stats = tokens.stats(dd)
        stats["teacher_vocab_hash"] = assets.vocab_hash(teacher_tok)
        stats["student_vocab_hash"] = assets.vocab_hash(student_tok)
        write_json(p.paths.metrics / "tokens.json", {**stats, "runtime": rt})
        run.log_metrics({f"{s}.{k}": v for s in ("train", "test") for k, v in stats[s].items()})
        run.set_tags({"kd.vocab_hash": stats["teacher_vocab_hash"]})
    print(f"tokenized: {stats['train']['blocks']} train / {stats['test']['blocks']} test blocks")


if __name__ == "__main__":
    cli.run(main)
