"""The teacher → student vocabulary map (kd.causal.xtok.vocab_map) and its coverage report
(kd.causal.xtok.coverage), on vocabularies small enough to check by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kd.causal.divergences import TopK, top_k
from kd.causal.xtok.coverage import coverage
from kd.causal.xtok.tokenizer import train_byte_bpe
from kd.causal.xtok.vocab_map import CLASSES, EXACT, LEFTOVER, PREFIX, build_vocab_map, token_class
from kd.causal.xtok.vocab_map import vocab_map as map_tokenizers

EOS = "<|endoftext|>"
# id:        0     1      2        3      4           5     6    7
TEACHER = [EOS, b"a", b" the", b"12", "é".encode(), b"!", b"", "<pad>"]
# id:          0       1     2      3       4     5      6        7         8
STUDENT = ["</s>", b"a", b" t", b" th", b"1", b"12", b"\xc3", b"<pad>", b"a"]


def test_rules_by_hand() -> None:
    m = build_vocab_map(TEACHER, STUDENT)
    # EOS: no student special of that name → leftover; a → a (the lower of the two b"a");
    # " the" → " th", the longest prefix (not " t"); 12 → 12; é → its first byte C3;
    # ! → nothing; the empty piece → nothing; the special "<pad>" never equals bytes b"<pad>".
    assert m.student_ids.tolist() == [-1, 1, 3, 5, 6, -1, -1, -1]
    assert m.rule.tolist() == [LEFTOVER, EXACT, PREFIX, EXACT, PREFIX, LEFTOVER, LEFTOVER, LEFTOVER]
    assert m.counts() == {"exact": 2, "prefix": 2, "leftover": 4}
    assert m.student_size == 9


def test_rules_are_configurable() -> None:
    no_prefix = build_vocab_map(TEACHER, STUDENT, prefix=False)
    assert no_prefix.student_ids.tolist() == [-1, 1, -1, 5, -1, -1, -1, -1]
    # A prefix must be at least 3 bytes: " th" still is, é's lone C3 no longer.
    long_prefix = build_vocab_map(TEACHER, STUDENT, min_prefix_bytes=3)
    assert long_prefix.student_ids.tolist() == [-1, 1, 3, 5, -1, -1, -1, -1]
    pinned = build_vocab_map(TEACHER, STUDENT, pinned={0: 0})
    assert pinned.student_ids[0] == 0 and pinned.rule[0] == EXACT
    with pytest.raises(ValueError, match="outside"):
        build_vocab_map(TEACHER, STUDENT, pinned={0: 99})
    with pytest.raises(ValueError, match="min_prefix_bytes"):
        build_vocab_map(TEACHER, STUDENT, min_prefix_bytes=0)


def test_token_classes_by_decoded_string() -> None:
    def name(piece):
        return CLASSES[token_class(piece)]

    assert [name(p) for p in TEACHER] == [
        "rare",  # a special
        "word",
        "word",  # a leading space is allowed
        "number",
        "rare",  # non-ASCII
        "punctuation",
        "rare",  # empty
        "rare",
    ]
    assert (
        name(b" 7") == "number" and name(b" \n") == "whitespace" and name(b" ...") == "punctuation"
    )
    assert name(b"'s") == "rare" and name(b"\xc3") == "rare"  # a mix; half a character


def test_coverage_by_hand() -> None:
    m = build_vocab_map(TEACHER, STUDENT)
    # Position 0: a 0.5 (exact), " the" 0.2 (prefix), ! 0.1 (leftover), rest 0.2.
    # Position 1: 12 0.4 (exact), é 0.3 (prefix), EOS 0.2 (leftover), rest 0.1.
    topk = TopK(
        ids=torch.tensor([[1, 2, 5], [3, 4, 0]]),
        logprobs=torch.tensor([[0.5, 0.2, 0.1], [0.4, 0.3, 0.2]], dtype=torch.float64).log(),
        rest=torch.tensor([0.2, 0.1], dtype=torch.float64).log(),
    )
    c = coverage(m, topk)
    assert c.positions == 2
    # Means over the two positions: exact (0.5 + 0.4) / 2, prefix (0.2 + 0.3) / 2,
    # leftover (0.1 + 0.2) / 2, rest (0.2 + 0.1) / 2; they add to 1.
    assert c.exact == pytest.approx(0.45) and c.prefix == pytest.approx(0.25)
    assert c.leftover == pytest.approx(0.15) and c.rest == pytest.approx(0.15)
    assert c.covered == pytest.approx(0.70)
    assert c.by_class["word"] == pytest.approx(
        {"mass": 0.35, "exact": 0.25, "prefix": 0.10, "leftover": 0.0, "covered": 1.0}
    )
    assert c.by_class["number"] == pytest.approx(
        {"mass": 0.20, "exact": 0.20, "prefix": 0.0, "leftover": 0.0, "covered": 1.0}
    )
    assert c.by_class["punctuation"] == pytest.approx(
        {"mass": 0.05, "exact": 0.0, "prefix": 0.0, "leftover": 0.05, "covered": 0.0}
    )
    # rare: é 0.3 (prefix) and EOS 0.2 (leftover) at position 1 → 0.15 + 0.10 of 0.25.
    assert c.by_class["rare"] == pytest.approx(
        {"mass": 0.25, "exact": 0.0, "prefix": 0.15, "leftover": 0.10, "covered": 0.6}
    )
    assert c.by_class["whitespace"]["mass"] == 0.0 and c.by_class["whitespace"]["covered"] is None
    assert [(w["token"], w["class"]) for w in c.worst_leftover] == [
        (EOS, "rare"),
        ("!", "punctuation"),
    ]
    assert [w["mass"] for w in c.worst_leftover] == pytest.approx([0.10, 0.05])
    assert [(w["id"], w["token"]) for w in c.worst_prefix] == [(4, "é"), (2, " the")]
    assert [w["mass"] for w in c.worst_prefix] == pytest.approx([0.15, 0.10])
    assert len(coverage(m, topk, worst=1).worst_prefix) == 1
    json.dumps(c.to_dict())  # plain numbers, strings and None only


@pytest.fixture(scope="module")
def tok():
    return train_byte_bpe(["the river runs past the mill, 12 times a day."] * 5, vocab_size=280)


def test_same_tokenizer_on_both_sides_is_the_identity(tok) -> None:
    m = map_tokenizers(tok, tok)
    assert torch.equal(m.student_ids, torch.arange(len(tok)))
    assert m.counts() == {"exact": len(tok), "prefix": 0, "leftover": 0}
    logits = torch.randn(6, len(tok), generator=torch.Generator().manual_seed(0))
    topk = top_k(logits, 20)
    c = coverage(m, topk)
    # Everything on the top-k maps exactly; only the rest bin is not covered.
    rest = topk.rest.double().exp().mean().item()
    assert c.covered == pytest.approx(1 - rest, abs=1e-6) and c.exact == c.covered
    assert c.prefix == 0.0 and c.leftover == 0.0 and c.rest == pytest.approx(rest)
    assert c.worst_leftover == [] and c.worst_prefix == []


def test_two_byte_level_tokenizers_map_every_text_token(tok) -> None:
    # A byte-level student holds every byte, so the prefix rule maps every non-empty teacher
    # byte string; only specials can be left over, and the EOS is pinned to the student's.
    student = train_byte_bpe(
        ["a small village"] * 3, vocab_size=262, special_tokens=("</s>",), eos_token="</s>"
    )
    m = map_tokenizers(tok, student)
    assert m.counts()["leftover"] == 0
    assert m.student_ids[tok.eos_token_id] == student.eos_token_id
    unpinned = map_tokenizers(tok, student, pin_eos=False)
    assert unpinned.rule[tok.eos_token_id] == LEFTOVER and unpinned.counts()["leftover"] == 1
    assert math.isclose(m.counts()["exact"] + m.counts()["prefix"], len(tok))


def test_logit_widths_padded_past_the_tokenizers(tok) -> None:
    v = len(tok)
    m = map_tokenizers(tok, tok, teacher_size=v + 4, student_size=v + 8)
    assert m.student_size == v + 8 and len(m.student_ids) == v + 4
    assert torch.equal(m.student_ids[:v], torch.arange(v))
    assert (m.student_ids[v:] == -1).all() and (m.rule[v:] == LEFTOVER).all()
    with pytest.raises(ValueError, match="student_size"):
        map_tokenizers(tok, tok, student_size=v - 1)
