"""Aligned groups of two tokenizations (kd.causal.xtok.align), checked by hand in bytes."""

from __future__ import annotations

import pytest
import torch

from kd.causal.xtok.align import (
    Group,
    align,
    align_offsets,
    char_to_byte_offsets,
    compared_positions,
)


def _ends(tokens: list[bytes]) -> list[int]:
    out, n = [], 0
    for t in tokens:
        n += len(t)
        out.append(n)
    return out


def test_identical_tokenizations_make_every_token_its_own_group() -> None:
    ends = _ends([b"The", b" river", b" runs", b"."])
    groups = align(ends, ends)
    assert [(g.teacher, g.student) for g in groups] == [((i, i + 1), (i, i + 1)) for i in range(4)]
    assert [g.end for g in groups] == ends


def test_worked_example_unbelievable() -> None:
    # teacher un|believ|able ends at bytes 2, 8, 12; student unbel|iev|able at 5, 8, 12.
    # Both end a token at 8 and at 12 only: groups {un, believ}~{unbel, iev} and {able}~{able}.
    teacher = _ends([b"un", b"believ", b"able"])
    student = _ends([b"unbel", b"iev", b"able"])
    assert (teacher, student) == ([2, 8, 12], [5, 8, 12])
    assert align(teacher, student) == [Group((0, 2), (0, 2), 8), Group((2, 3), (2, 3), 12)]
    t_pos, s_pos = compared_positions(align(teacher, student))
    assert t_pos.tolist() == [1, 2] and s_pos.tolist() == [1, 2]
    t_pos, s_pos = compared_positions(align(teacher, student), include_last=False)
    assert t_pos.tolist() == [1] and s_pos.tolist() == [1]
    assert t_pos.dtype == s_pos.dtype == torch.long


def test_multi_byte_character_split_by_one_side() -> None:
    # "né!" is 4 bytes: n (1), é = C3 A9 (2), ! (1).
    # teacher n|é|!  ends at 1, 3, 4; student n|C3|A9|! (byte-level, é split) at 1, 2, 3, 4.
    teacher = _ends([b"n", "é".encode(), b"!"])
    student = _ends([b"n", b"\xc3", b"\xa9", b"!"])
    assert (teacher, student) == ([1, 3, 4], [1, 2, 3, 4])
    # Byte 2 (inside é) is the student's alone, so é on the teacher's side goes with both halves.
    expected = [Group((0, 1), (0, 1), 1), Group((1, 2), (1, 3), 3), Group((2, 3), (3, 4), 4)]
    assert align(teacher, student) == expected
    # The same from character offsets: a fast tokenizer gives both halves of é its span (1, 2),
    # which is bytes (1, 3); the group closes after the last token ending at byte 3.
    text = "né!"
    assert char_to_byte_offsets(text, [(0, 1), (1, 2), (1, 2), (2, 3)]) == [
        (0, 1),
        (1, 3),
        (1, 3),
        (3, 4),
    ]
    got = align_offsets(text, [(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (1, 2), (2, 3)])
    assert got == expected


def test_split_on_both_sides_differently_leaves_one_group() -> None:
    # "é!" : teacher C3|A9! ends at 1, 3; student C3A9|! at 2, 3: only the end is shared.
    assert align([1, 3], [2, 3]) == [Group((0, 2), (0, 2), 3)]


def test_zero_length_tokens_join_a_group_instead_of_closing_one() -> None:
    # A BOS at byte 0 on the teacher's side only, and an EOS at the end on the student's only.
    teacher = [0, 3, 6]  # <s> | abc | def
    student = [3, 6, 6]  # abc | def | </s>
    assert align(teacher, student) == [Group((0, 2), (0, 1), 3), Group((2, 3), (1, 3), 6)]


def test_refuses_tokenizations_of_different_text_or_unordered_ends() -> None:
    with pytest.raises(ValueError, match="different text"):
        align([2, 5], [2, 4])
    with pytest.raises(ValueError, match="must not decrease"):
        align([2, 1, 5], [5])
    with pytest.raises(ValueError, match="empty"):
        align([], [3])
    assert align([], []) == []
    with pytest.raises(ValueError, match="unit"):
        align_offsets("a", [(0, 1)], [(0, 1)], unit="word")


def test_two_trained_tokenizers_align_into_equal_byte_spans() -> None:
    from kd.causal.xtok.pieces import byte_ends, vocab_pieces
    from kd.causal.xtok.tokenizer import train_byte_bpe

    corpus = ["the river runs past the mill and the river bends"] * 4
    teacher = train_byte_bpe(corpus, vocab_size=300)
    student = train_byte_bpe(corpus[:1] + ["river mill"], vocab_size=270)
    text = "the river bends past the mill, café"
    t_ids, s_ids = teacher(text)["input_ids"], student(text)["input_ids"]
    t_ends = byte_ends(vocab_pieces(teacher), t_ids)
    s_ends = byte_ends(vocab_pieces(student), s_ids)
    groups = align(t_ends, s_ends)
    # The groups tile both token sequences, and each pair spans the same bytes.
    assert groups[0].teacher[0] == groups[0].student[0] == 0
    assert groups[-1].teacher[1] == len(t_ids) and groups[-1].student[1] == len(s_ids)
    start = 0
    for g, nxt in zip(groups, groups[1:] + [None], strict=True):
        assert t_ends[g.teacher[1] - 1] == s_ends[g.student[1] - 1] == g.end > start
        if nxt is not None:
            assert (nxt.teacher[0], nxt.student[0]) == (g.teacher[1], g.student[1])
        start = g.end
    # Every space starts a token in both (the pre-tokenizer splits there): at least one group
    # per word.
    assert len(groups) >= len(text.split())
    # Both split é (C3|A9) at the same byte, so the exact path has a group ending inside it;
    # the char-offset path cannot see that byte and merges the last two groups, as documented.
    assert groups[-2].end == len(text.encode()) - 1
    merged = Group((groups[-2].teacher[0], len(t_ids)), (groups[-2].student[0], len(s_ids)), 36)
    by_chars = align_offsets(
        text,
        teacher(text, return_offsets_mapping=True)["offset_mapping"],
        student(text, return_offsets_mapping=True)["offset_mapping"],
    )
    assert by_chars == groups[:-2] + [merged]
