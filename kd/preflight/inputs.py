"""What the input files can tell: the corpus sample and the probe's labelled set.

The corpus check takes the very sample the sample_corpus stage will take (kd/data/corpus.py,
under a second on the default corpus), so every message that stage can give about a missing path,
an empty folder, an unreadable file or too few documents is given here, before DVC deletes
data/corpus. A hub source is streamed over the network and is left to its stage.
"""

from __future__ import annotations

import math

from kd.core.params import Params
from kd.data import corpus


def max_blocks(docs: list[corpus.Document], max_seq_length: int) -> int:
    """An upper bound on the training blocks tokenize can pack from ``docs``.

    A tokenizer makes at most one token per byte of UTF-8 (WordPiece: at most one per character;
    byte-level BPE: at most one per byte), each document adds one separator, and a block holds
    ``max_seq_length - 2`` of them (kd/data/tokens.py). So a bound below the batch size proves
    the split too small without tokenizing it.
    """
    tokens = sum(len(d.text.encode("utf-8")) + 1 for d in docs)
    return math.ceil(tokens / (max_seq_length - 2))


def causal_max_blocks(docs: list[corpus.Document], block_size: int) -> int:
    """An upper bound on the causal blocks causal_tokenize can pack from ``docs``: at most one
    token per UTF-8 byte (no special tokens are added), plus each document's EOS and, for a
    SentencePiece tokenizer, a leading piece; the last partial block is dropped. So a bound below
    what params ask for proves the split too small without tokenizing it (the stage's exact
    count, kd/causal/tokens.py, refuses the rest)."""
    return sum(len(d.text.encode("utf-8")) + 2 for d in docs) // block_size


def check_causal_blocks(p: Params, splits: dict[str, list[corpus.Document]]) -> None:
    # Every block asked for; with null (every block), one training step's batch, or one block.
    floor = {"train": p.causal.train.batch_size, "test": 1}
    for split in ("train", "test"):
        key, want = f"causal.{split}_blocks", getattr(p.causal, f"{split}_blocks")
        bound = causal_max_blocks(splits[split], p.causal.block_size)
        if bound < (want or floor[split]):
            asks = (f"{key}={want} asks for {want} blocks" if want else
                    f"{key}: null takes every block, and {floor[split]} are needed")  # fmt: skip
            raise SystemExit(
                f"{asks}, but the {split} split's {len(splits[split])} document(s) pack into at "
                f"most {bound} block(s) of causal.block_size={p.causal.block_size} tokens: "
                + (f"lower {key} (below {bound + 1}; causal_tokenize counts them exactly), or "
                   if want and bound else "")  # fmt: skip
                + "sample more text (corpus.n_docs / corpus.n_words, a larger corpus, or "
                "corpus.test_fraction for the test split)"
            )


def check_corpus(p: Params) -> None:
    if p.corpus.source == "hf":
        return
    splits = corpus.sample(p.corpus, p.corpus.seed)
    train, test = splits["train"], splits["test"]
    need = p.train.batch_size
    bound = max_blocks(train, p.tokenize.max_seq_length)
    if bound >= need:
        return
    everything = max_blocks(train + test, p.tokenize.max_seq_length)
    if everything >= need:
        fix = (f"lower corpus.test_fraction (now {p.corpus.test_fraction}), sample more "
               "documents, or lower train.batch_size")
    else:
        fix = ("sample more documents (corpus.n_docs / corpus.n_words, or a larger corpus), or "
               f"lower train.batch_size to at most {max(1, bound)}")
    raise SystemExit(
        f"the train split would hold {len(train)} document(s) ({len(test)} are held out by "
        f"corpus.test_fraction={p.corpus.test_fraction}), at most {bound} block(s) of "
        f"tokenize.max_seq_length={p.tokenize.max_seq_length} tokens; one training step needs "
        f"train.batch_size={need}: {fix}"
    )


def check_probe(p: Params) -> None:
    if p.probe.source == "hf":
        return
    from kd.probe import probe

    probe.load_split(p.probe)


def check(p: Params) -> None:
    check_corpus(p)
    check_probe(p)


def check_causal(p: Params) -> None:
    """The causal pipeline's inputs: enough text for its blocks, and the probe's set if used."""
    if p.corpus.source != "hf":
        check_causal_blocks(p, corpus.sample(p.corpus, p.corpus.seed))
    if p.causal.probe_examples:
        check_probe(p)
