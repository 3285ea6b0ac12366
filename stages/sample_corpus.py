"""sample_corpus: a seeded, document-level sample of the corpus, split into train and test."""

from __future__ import annotations

import pandas as pd

from kd.core import cli, runtime, tracking
from kd.core.io import atomic_dir, write_json
from kd.core.params import load_params
from kd.data import corpus


def main() -> None:
    p = load_params()
    rt = runtime.record()
    with tracking.start_run("sample_corpus", params=p.corpus.model_dump(), runtime=rt) as run:
        splits = corpus.sample(p.corpus, p.corpus.seed)
        with atomic_dir(p.paths.corpus) as tmp:
            for name, docs in splits.items():
                corpus.write_split(tmp / f"{name}.jsonl", docs)
        stats = corpus.stats(splits)
        for name, docs in splits.items():
            frame = pd.DataFrame({"id": [d.id for d in docs], "text": [d.text for d in docs]})
            run.log_dataset(frame, f"corpus/{name}", p.paths.corpus / f"{name}.jsonl", name)
        write_json(p.paths.metrics / "corpus.json", {**stats, "runtime": rt})
        run.log_metrics({f"{s}.{k}": v for s, d in stats.items() for k, v in d.items()})
    print(f"sampled {stats['train']['docs']} train and {stats['test']['docs']} test documents")


if __name__ == "__main__":
    cli.run(main)
