from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from kd.data import assets, tokens
from kd.data.corpus import Document
from kd.data.masking import IGNORE, mask_tokens

CLS, SEP, PAD, MASK = 101, 102, 0, 103


# --- pack ----------------------------------------------------------------------------------------


def test_pack_hand_example() -> None:
    # Stream: 5 6 7 SEP 8 SEP (empty documents contribute nothing), cut into pieces of 6-2=4.
    out = tokens.pack([[5, 6, 7], [], [8]], max_len=6, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(
        out["input_ids"],
        [[CLS, 5, 6, 7, SEP, SEP], [CLS, 8, SEP, SEP, PAD, PAD]],
    )
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(
        out["special_tokens_mask"], [[1, 0, 0, 0, 1, 1], [1, 0, 1, 1, 1, 1]]
    )
    for col in out.values():
        assert col.shape == (2, 6)
        assert col.dtype == np.int64


def test_pack_exact_fit_has_no_padding() -> None:
    # Stream 1 2 3 SEP 4 5 6 SEP: exactly two pieces of 4.
    out = tokens.pack([[1, 2, 3], [4, 5, 6]], max_len=6, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(
        out["input_ids"], [[CLS, 1, 2, 3, SEP, SEP], [CLS, 4, 5, 6, SEP, SEP]]
    )
    assert out["attention_mask"].all()


def test_pack_every_block_starts_with_cls_and_ends_with_sep() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1000, 2000, size=n).tolist() for n in rng.integers(1, 40, size=20)]
    out = tokens.pack(docs, max_len=16, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    ids, att, special = out["input_ids"], out["attention_mask"], out["special_tokens_mask"]
    assert (ids[:, 0] == CLS).all()
    last = att.sum(axis=1) - 1
    assert (ids[np.arange(len(ids)), last] == SEP).all()
    assert att[:-1].all()  # only the last block may be padded
    assert ((ids == PAD) == (att == 0)).all()
    # Special = CLS, SEP or padding; the rest is exactly the documents' tokens, in order.
    np.testing.assert_array_equal(special, np.isin(ids, [CLS, SEP]) | (att == 0))
    np.testing.assert_array_equal(ids[special == 0], np.concatenate(docs))


def test_pack_nothing_to_pack() -> None:
    with pytest.raises(SystemExit, match="tokenized to nothing"):
        tokens.pack([[], []], max_len=8, cls_id=CLS, sep_id=SEP, pad_id=PAD)


# --- mask_tokens ---------------------------------------------------------------------------------


def _big_batch(rows: int = 256, length: int = 128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (rows, length), generator=g)
    special = torch.zeros_like(ids)
    special[:, 0] = 1
    special[:, -1] = 1
    special[::4, 100:] = 1  # padded rows
    ids[special.bool()] = SEP
    return ids, special


def _mask(ids, special, p=0.15, seed=0):
    return mask_tokens(ids, special, MASK, 30522, p, torch.Generator().manual_seed(seed))


def test_mask_only_non_special_positions() -> None:
    ids, special = _big_batch()
    masked, labels = _mask(ids, special)
    chosen = labels != IGNORE
    assert not (chosen & special.bool()).any()
    assert torch.equal(masked[special.bool()], ids[special.bool()])
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing unchosen is corrupted
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
    assert masked.shape == ids.shape and masked.dtype == ids.dtype
    assert not torch.equal(masked, ids)  # and the input tensor itself is untouched
    assert (ids[special.bool()] == SEP).all()


def test_mask_rate_and_80_10_10_split() -> None:
    ids, special = _big_batch()
    masked, labels = _mask(ids, special)
    chosen = labels != IGNORE
    rate = chosen.sum().item() / (~special.bool()).sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = chosen.sum().item()
    to_mask = (masked[chosen] == MASK).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    randomised = 1 - to_mask - kept
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)
    assert randomised == pytest.approx(0.1, abs=0.02)


def test_mask_is_deterministic_for_a_generator() -> None:
    ids, special = _big_batch(rows=16)
    a, b, c = _mask(ids, special, seed=3), _mask(ids, special, seed=3), _mask(ids, special, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_at_least_one_position_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (200, 6), generator=g)
    special = torch.zeros_like(ids)
    special[:, 0] = special[:, -1] = 1
    special[-1] = 1  # a row with no real token: nothing to choose
    # At 1% almost every row would otherwise have no target.
    _, labels = _mask(ids, special, p=0.01)
    per_row = (labels != IGNORE).sum(dim=1)
    assert (per_row[:-1] >= 1).all()
    assert per_row[-1] == 0


# --- dual tokenization ---------------------------------------------------------------------------


def test_tokenize_both_same_tokenizer(default_tokenizer, tiny_docs) -> None:
    ds = tokens.tokenize_both(tiny_docs, default_tokenizer, default_tokenizer)
    assert ds.column_names == ["id", "text", "ids"]
    assert ds["id"] == [d.id for d in tiny_docs]
    first = default_tokenizer(tiny_docs[0].text, add_special_tokens=False)["input_ids"]
    assert ds[0]["ids"] == first


def test_tokenize_both_rebuilt_default_agrees(default_tokenizer, tiny_docs) -> None:
    # What the pipeline does for a student built from a config: the teacher's vocab.txt, rebuilt.
    student = assets.rebuilt_tokenizer("default")
    ds = tokens.tokenize_both(tiny_docs, default_tokenizer, student)
    assert len(ds) == len(tiny_docs)


@pytest.fixture
def tiny_vocab_tokenizer(tmp_path):
    """The teacher's first 2000 word pieces only: same ids for those, [UNK] for the rest."""
    from transformers import BertTokenizer

    lines = (assets.default_teacher_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(lines[:2000]) + "\n", encoding="utf-8")
    return BertTokenizer(str(vocab), do_lower_case=True)


def test_tokenize_both_mismatch_names_document_position_and_tokens(
    default_tokenizer, tiny_vocab_tokenizer
) -> None:
    docs = [
        Document("agrees", "The. A, the of and in the."),  # only ids < 2000: identical
        Document("disagrees", "The of and xylophone in the."),
        Document("also-disagrees", "xylophone"),
    ]
    teacher_piece = default_tokenizer.tokenize("xylophone")[0]
    with pytest.raises(tokens.TokenizerMismatch) as info:
        tokens.tokenize_both(docs, default_tokenizer, tiny_vocab_tokenizer)
    msg = str(info.value)
    assert "'disagrees'" in msg
    assert "word piece 3" in msg
    assert repr(teacher_piece) in msg
    assert "'[UNK]'" in msg
    assert "tokenize.student_tokenizer" in msg  # the fix
    assert isinstance(info.value, SystemExit)


# --- build ---------------------------------------------------------------------------------------


def _build(docs, tok, train_size: int, mask_seed: int = 1234) -> DatasetDict:
    splits = {"test": docs[:5], "train": docs[5 : 5 + train_size]}
    return tokens.build(splits, tok, tok, 32, 0.15, mask_seed)


def test_build_columns_and_shapes(default_tokenizer, tiny_docs) -> None:
    dd = _build(tiny_docs, default_tokenizer, 25)
    assert set(dd) == {"train", "test"}
    for ds in dd.values():
        assert tuple(ds.column_names) == tokens.COLUMNS
        ids = np.asarray(ds["input_ids"])
        labels = np.asarray(ds["mlm_labels"])
        assert ids.shape[1] == 32
        assert (ids[:, 0] == default_tokenizer.cls_token_id).all()
        chosen = labels != IGNORE
        assert (labels[chosen] == ids[chosen]).all()
        assert (chosen.sum(axis=1) >= 1).all()
    s = tokens.stats(dd)
    assert s["train"]["blocks"] == len(dd["train"])
    assert 0 <= s["test"]["padding_fraction"] < 1
    assert s["train"]["masked_positions"] > 0


def test_build_test_masks_do_not_depend_on_train_size(default_tokenizer, tiny_docs) -> None:
    small = _build(tiny_docs, default_tokenizer, 5)
    large = _build(tiny_docs, default_tokenizer, 25)
    assert len(small["train"]) < len(large["train"])
    for col in ("mlm_input_ids", "mlm_labels"):
        assert small["test"][col] == large["test"][col]
    other_seed = _build(tiny_docs, default_tokenizer, 5, mask_seed=99)
    assert other_seed["test"]["mlm_labels"] != small["test"]["mlm_labels"]


# --- load ----------------------------------------------------------------------------------------


def _saved(tmp_path, default_tokenizer, tiny_docs):
    path = tmp_path / "tokens"
    _build(tiny_docs, default_tokenizer, 5).save_to_disk(str(path))
    return path


def test_load_round_trip(tmp_path, default_tokenizer, tiny_docs) -> None:
    path = _saved(tmp_path, default_tokenizer, tiny_docs)
    dd = tokens.load(path)
    assert set(dd) == {"train", "test"}


def test_load_missing_folder(tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"dvc repro -f tokenize"):
        tokens.load(tmp_path / "nothing-here")


def test_load_corrupted_folder(tmp_path, default_tokenizer, tiny_docs) -> None:
    path = _saved(tmp_path, default_tokenizer, tiny_docs)
    for arrow in path.rglob("*.arrow"):
        arrow.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(SystemExit) as info:
        tokens.load(path)
    assert "missing or corrupted" in str(info.value)
    assert "`dvc repro -f tokenize`" in str(info.value)


def test_load_wrong_columns(tmp_path) -> None:
    path = tmp_path / "tokens"
    one = Dataset.from_dict({"input_ids": [[1, 2]]})
    DatasetDict({"train": one, "test": one}).save_to_disk(str(path))
    with pytest.raises(SystemExit, match=r"lacks columns .*dvc repro -f tokenize"):
        tokens.load(path)
