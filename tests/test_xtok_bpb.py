"""Bits per byte (kd.causal.xtok.bpb): a uniform byte model is 8 bits per byte, a hand example,
and per-token byte counts from offsets and from token bytes."""

from __future__ import annotations

import math

import pytest
import torch

from kd.causal.xtok.bpb import bits_per_byte, byte_lengths_from_offsets
from kd.causal.xtok.pieces import byte_lengths, vocab_pieces
from kd.causal.xtok.tokenizer import train_byte_bpe


def test_uniform_model_over_256_single_byte_tokens_is_8_bits_per_byte() -> None:
    pieces = [bytes([b]) for b in range(256)]
    targets = torch.tensor(list("any text, même accentuée".encode()))
    logits = torch.zeros(len(targets), 256, dtype=torch.float64)  # uniform: q = 1/256
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    n_bytes = torch.tensor(byte_lengths(pieces, targets.tolist()))
    assert (n_bytes == 1).all()
    assert bits_per_byte(nll, n_bytes) == pytest.approx(8.0, abs=1e-12)


def test_hand_example_and_the_mask() -> None:
    # Three tokens of 1, 2 and 3 bytes at ln 2, ln 4, ln 8 nats = 1, 2, 3 bits: 6 bits / 6 bytes.
    nll = torch.tensor([math.log(2), math.log(4), math.log(8), 5.0])
    n_bytes = torch.tensor([1, 2, 3, 0])  # the fourth is a predicted EOS: no bytes
    keep = torch.tensor([True, True, True, False])
    assert bits_per_byte(nll, n_bytes, keep) == pytest.approx(1.0, abs=1e-6)
    # Counted, the EOS adds its 5 nats = 5 / ln 2 bits over the same 6 bytes.
    assert bits_per_byte(nll, n_bytes) == pytest.approx((6 + 5 / math.log(2)) / 6, abs=1e-6)
    # Any shape: [batch, positions] is the same sum.
    assert bits_per_byte(nll[:2].reshape(1, 2), n_bytes[:2].reshape(1, 2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no bytes"):
        bits_per_byte(nll[3:], n_bytes[3:])
    with pytest.raises(ValueError, match="differ"):
        bits_per_byte(nll, n_bytes[:2])


def test_byte_lengths_from_offsets_by_hand() -> None:
    # "né!": n (1 byte), é split in two tokens that both carry its span (1, 2), !, then an EOS
    # with the (0, 0) span: é's 2 bytes go to its first piece; the total is the text's 4 bytes.
    got = byte_lengths_from_offsets("né!", [(0, 1), (1, 2), (1, 2), (2, 3), (0, 0)])
    assert got.tolist() == [1, 2, 0, 1, 0]
    # Trimmed offsets skip the space: the next token is charged for it.
    assert byte_lengths_from_offsets("abc def", [(0, 3), (4, 7)], unit="byte").tolist() == [3, 4]
    with pytest.raises(ValueError, match="unit"):
        byte_lengths_from_offsets("a", [(0, 1)], unit="token")


def test_offsets_and_token_bytes_agree_on_the_total() -> None:
    tok = train_byte_bpe(["the café by the river, 12 times"] * 3, vocab_size=270)
    text = "日本の café, 12 times"
    enc = tok(text, return_offsets_mapping=True)
    from_offsets = byte_lengths_from_offsets(text, enc["offset_mapping"])
    from_pieces = byte_lengths(vocab_pieces(tok), enc["input_ids"])
    assert int(from_offsets.sum()) == sum(from_pieces) == len(text.encode("utf-8"))
