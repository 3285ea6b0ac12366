"""The corpus: read documents from a source, normalise them, and take a seeded sample.

Normalisation, in this order: Unicode NFC; every run of whitespace (newlines included) becomes one
space, and the ends are stripped; documents shorter than ``min_chars`` after that are dropped;
exact duplicates (after normalisation) are dropped, keeping the first. The sample is a seeded
permutation of the documents in source order, so the same params give byte-identical outputs;
the test split is its first ``test_fraction`` share of *documents* (never sentences), so no text
of a test document is ever trained on.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.core.params import Corpus
from kd.data.assets import hub_dataset, wiki_offline_file

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def _read_wiki_offline() -> Iterator[Document]:
    path = wiki_offline_file()
    data = json.loads(path.read_text(encoding="utf-8"))
    for title, entry in data.items():
        yield Document(id=title, text=(entry or {}).get("extract") or "")


def _text_files(path: Path) -> list[Path]:
    if not path.exists():
        raise SystemExit(
            f"corpus.text_path '{path}' does not exist: point it at a .txt, .jsonl or .parquet "
            "file, or a folder of them"
        )
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    bad = [p for p in files if p.suffix not in TEXT_SUFFIXES]
    if bad or not files:
        raise SystemExit(
            f"corpus.text_path '{path}' holds no readable documents: expected files ending in "
            f"{', '.join(TEXT_SUFFIXES)}"
        )
    return files


def _read_text_file(path: Path, column: str) -> Iterator[Document]:
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if column not in frame:
            raise SystemExit(
                f"{path} has no column '{column}' (columns: {list(frame.columns)}): set "
                "corpus.text_column"
            )
        for i, text in enumerate(frame[column].tolist()):
            yield Document(id=f"{path.name}:{i}", text=str(text or ""))
        return
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SystemExit(
            f"{path} is not valid UTF-8 (byte {err.start}: {err.reason}): re-encode it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from None
    if path.suffix == ".txt":
        # Documents are separated by blank lines; a file without blank lines is one document.
        for i, block in enumerate(raw.split("\n\n")):
            yield Document(id=f"{path.name}:{i}", text=block)
        return
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}, line {i + 1}, is not JSON ({err.msg}): fix or remove it") from None
        if column not in record:
            raise SystemExit(
                f"{path}, line {i + 1}, has no field '{column}': set corpus.text_column"
            )
        yield Document(id=f"{path.name}:{i}", text=str(record[column] or ""))


def read_documents(cfg: Corpus) -> Iterator[Document]:
    if cfg.source == "wiki_offline":
        yield from _read_wiki_offline()
    elif cfg.source == "text":
        for f in _text_files(Path(cfg.text_path)):
            yield from _read_text_file(f, cfg.text_column)
    else:
        raise ValueError("hub corpora are streamed by sample(), not read whole")


def clean(docs: Iterable[Document], min_chars: int) -> Iterator[Document]:
    seen: set[str] = set()
    for doc in docs:
        text = normalise(doc.text)
        if len(text) < min_chars or text in seen:
            continue
        seen.add(text)
        yield Document(doc.id, text)


def _hf_pool(cfg: Corpus, seed: int) -> list[Document]:
    # A hub corpus is streamed: shuffle within a buffer, then read only what the sample needs
    # (with headroom for documents that normalisation drops).
    stream = hub_dataset("corpus.hf_name", cfg.hf_name, cfg.hf_config, cfg.hf_split,
                         "use corpus.source: wiki_offline or text", streaming=True)
    stream = stream.shuffle(seed=seed, buffer_size=10_000)
    pool, words = [], 0
    for i, record in enumerate(stream):
        pool.append(Document(str(record.get("id", i)), str(record[cfg.hf_text_column] or "")))
        words += len(pool[-1].text.split())
        if (cfg.n_docs and len(pool) >= 2 * cfg.n_docs) or (cfg.n_words and words >= 2 * cfg.n_words):
            break
    return pool


def sample(cfg: Corpus, seed: int) -> dict[str, list[Document]]:
    """Return {'train': [...], 'test': [...]}: a seeded, document-level sample and split."""
    raw = _hf_pool(cfg, seed) if cfg.source == "hf" else read_documents(cfg)
    docs = list(clean(raw, cfg.min_chars))
    if not docs:
        raise SystemExit(
            f"the corpus (source: {cfg.source}) has no documents of at least corpus.min_chars="
            f"{cfg.min_chars} characters: check the source, or lower corpus.min_chars"
        )
    order = np.random.default_rng(seed).permutation(len(docs))
    if cfg.n_docs is not None:
        if cfg.n_docs > len(docs):
            raise SystemExit(
                f"corpus.n_docs={cfg.n_docs} is more than the {len(docs)} usable documents in "
                f"the corpus: set corpus.n_docs to at most {len(docs)}, or null for all"
            )
        order = order[: cfg.n_docs]
    elif cfg.n_words is not None:
        words = np.cumsum([len(docs[i].text.split()) for i in order])
        if words[-1] < cfg.n_words:
            raise SystemExit(
                f"corpus.n_words={cfg.n_words} is more than the {int(words[-1])} words in the "
                "corpus: lower it, or set it to null for all"
            )
        order = order[: int(np.searchsorted(words, cfg.n_words)) + 1]
    picked = [docs[i] for i in order]
    n_test = max(1, math.ceil(len(picked) * cfg.test_fraction))
    if n_test >= len(picked):
        raise SystemExit(
            f"only {len(picked)} document(s) sampled: too few to hold out a test split; "
            "sample more documents or lower corpus.test_fraction"
        )
    return {"train": picked[n_test:], "test": picked[:n_test]}


def stats(splits: dict[str, list[Document]]) -> dict[str, dict[str, int]]:
    return {
        name: {
            "docs": len(docs),
            "words": sum(len(d.text.split()) for d in docs),
            "chars": sum(len(d.text) for d in docs),
        }
        for name, docs in splits.items()
    }


def write_split(path: Path, docs: list[Document]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")


def read_split(path: Path) -> list[Document]:
    with path.open(encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]
