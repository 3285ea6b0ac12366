"""Dual tokenization, packing into fixed-length blocks, and the fixed evaluation masks.

As in the original study, every document is tokenized by the teacher's tokenizer *and* the
student's, and the two must agree token for token: distilling logits over a vocabulary means
position i of both models must see the same word piece. The first disagreement stops the stage
with the document, position and both tokens, before anything is written.

Packing: each document's word pieces are followed by [SEP] and concatenated (within a split, in
order); the stream is cut into pieces of ``max_seq_length - 2`` and each piece is framed as
[CLS] piece [SEP]. Only the last block of a split can be short; it is padded, and its attention
mask marks the padding.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from kd.data.corpus import Document
from kd.data.masking import mask_tokens

COLUMNS = ("input_ids", "attention_mask", "special_tokens_mask", "mlm_input_ids", "mlm_labels")


class TokenizerMismatch(SystemExit):
    pass


def tokenize_both(docs: list[Document], teacher_tok, student_tok, num_proc: int = 1) -> Dataset:
    """A dataset of documents with their teacher ids, checked equal to the student's."""

    def encode(batch):
        t = teacher_tok(batch["text"], add_special_tokens=False)["input_ids"]
        s = student_tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": t, "same": [a == b for a, b in zip(t, s, strict=True)], "student_ids": s}

    ds = Dataset.from_dict({"id": [d.id for d in docs], "text": [d.text for d in docs]})
    ds = ds.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None)
    same = ds["same"]
    if not all(same):
        i = same.index(False)
        raise TokenizerMismatch(_mismatch_message(ds[i], teacher_tok, student_tok))
    return ds.remove_columns(["same", "student_ids"])


def _mismatch_message(row, teacher_tok, student_tok) -> str:
    t, s = row["ids"], row["student_ids"]
    pos = next((i for i, (a, b) in enumerate(zip(t, s, strict=False)) if a != b), min(len(t), len(s)))
    tt = teacher_tok.convert_ids_to_tokens(t[pos]) if pos < len(t) else "<end>"
    st = student_tok.convert_ids_to_tokens(s[pos]) if pos < len(s) else "<end>"
    return (
        f"the teacher's and the student's tokenizers disagree on document '{row['id']}' at word "
        f"piece {pos}: teacher {tt!r} (id {t[pos] if pos < len(t) else '-'}) vs student {st!r} "
        f"(id {s[pos] if pos < len(s) else '-'}); context: {row['text'][:120]!r}. Logit "
        "distillation needs one vocabulary: give both the same tokenizer (tokenize."
        "teacher_tokenizer / tokenize.student_tokenizer) or a student built on the teacher's "
        "vocabulary. Nothing was written."
    )


def pack(ids: list[list[int]], max_len: int, cls_id: int, sep_id: int, pad_id: int) -> dict:
    """Pack documents into [CLS] ... [SEP] blocks of ``max_len``; returns numpy columns."""
    body = max_len - 2
    stream = np.fromiter(
        (t for doc in ids if doc for t in (*doc, sep_id)), dtype=np.int64
    )
    if stream.size == 0:
        raise SystemExit("every document tokenized to nothing: the split has no text to train on")
    n_blocks = -(-stream.size // body)
    padded = np.full(n_blocks * body, pad_id, dtype=np.int64)
    padded[: stream.size] = stream
    pieces = padded.reshape(n_blocks, body)
    real = np.zeros_like(pieces, dtype=bool)
    real.reshape(-1)[: stream.size] = True
    blocks = np.full((n_blocks, max_len), pad_id, dtype=np.int64)
    blocks[:, 0] = cls_id
    blocks[:, 1:-1] = pieces
    lengths = real.sum(axis=1)
    blocks[np.arange(n_blocks), lengths + 1] = sep_id
    attention = (np.arange(max_len)[None, :] < (lengths + 2)[:, None]).astype(np.int64)
    # Document separators inside a block are special too: never masked, never predicted.
    special = (np.isin(blocks, [cls_id, sep_id]) | (attention == 0)).astype(np.int64)
    # A last block holding only a separator ([CLS][SEP][SEP]) has nothing to learn from.
    keep = (special == 0).any(axis=1)
    return {
        "input_ids": blocks[keep],
        "attention_mask": attention[keep],
        "special_tokens_mask": special[keep],
    }


def build_split(
    docs: list[Document],
    teacher_tok,
    student_tok,
    max_len: int,
    mlm_probability: float,
    generator: torch.Generator,
    num_proc: int = 1,
) -> Dataset:
    tokenized = tokenize_both(docs, teacher_tok, student_tok, num_proc)
    cols = pack(
        tokenized["ids"],
        max_len,
        teacher_tok.cls_token_id,
        teacher_tok.sep_token_id,
        teacher_tok.pad_token_id,
    )
    masked, labels = mask_tokens(
        torch.from_numpy(cols["input_ids"]),
        torch.from_numpy(cols["special_tokens_mask"]),
        teacher_tok.mask_token_id,
        len(teacher_tok),
        mlm_probability,
        generator,
    )
    cols["mlm_input_ids"] = masked.numpy()
    cols["mlm_labels"] = labels.numpy()
    # int32 ids, int8 masks: a quarter of the disk and load time of int64.
    return Dataset.from_dict(
        {
            "input_ids": cols["input_ids"].astype(np.int32),
            "attention_mask": cols["attention_mask"].astype(np.int8),
            "special_tokens_mask": cols["special_tokens_mask"].astype(np.int8),
            "mlm_input_ids": cols["mlm_input_ids"].astype(np.int32),
            "mlm_labels": cols["mlm_labels"].astype(np.int32),
        }
    )


def build(
    splits: dict[str, list[Document]],
    teacher_tok,
    student_tok,
    max_len: int,
    mlm_probability: float,
    mask_seed: int,
    num_proc: int = 1,
) -> DatasetDict:
    out = {}
    for i, (name, docs) in enumerate(sorted(splits.items())):
        # One generator per split, offset by split: the test masks never depend on train's size.
        gen = torch.Generator().manual_seed(mask_seed + 1000 * i)
        out[name] = build_split(docs, teacher_tok, student_tok, max_len, mlm_probability, gen, num_proc)
    return DatasetDict(out)


def stats(dd: DatasetDict) -> dict[str, dict[str, float]]:
    out = {}
    for name, ds in dd.items():
        att = np.asarray(ds["attention_mask"])
        lab = np.asarray(ds["mlm_labels"])
        out[name] = {
            "blocks": int(att.shape[0]),
            "tokens": int(att.sum()),
            "padding_fraction": float(1 - att.mean()),
            "masked_positions": int((lab != -100).sum()),
        }
    return out


def load(path) -> DatasetDict:
    """Load the tokenize stage's output, with a clear error if it is missing or corrupted."""
    from datasets import load_from_disk

    try:
        dd = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds for a broken folder
        raise SystemExit(
            f"cannot read the token dataset at {path} ({type(err).__name__}: {err}): it is "
            "missing or corrupted; rebuild it with `dvc repro -f tokenize`"
        ) from None
    missing = [c for c in COLUMNS if c not in dd["train"].column_names]
    if missing:
        raise SystemExit(
            f"the token dataset at {path} lacks columns {missing}: it was written by another "
            "version; rebuild it with `dvc repro -f tokenize`"
        )
    return dd
