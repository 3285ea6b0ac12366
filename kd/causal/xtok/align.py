"""Where two tokenizations of one text agree, and which of their positions can be compared.

Two tokenizers split the same text at different places. An *aligned group* is a maximal run of
tokens on each side that ends at a byte where both tokenizations end a token (Boizard et al. 2024
align the same way; TRL's GOLD trainer walks byte offsets likewise). The worked example of the
tests: teacher ``un|believ|able`` ends at bytes 2, 8, 12; student ``unbel|iev|able`` at 5, 8, 12;
they agree at 8 and 12, so the groups are teacher 0..2 with student 0..2, then 2..3 with 2..3.

Everything is in UTF-8 **bytes**: a byte-level BPE token can end inside a multi-byte character,
and only a byte offset can say so. Two ways in:

* exact: :func:`kd.causal.xtok.pieces.byte_ends` from each token's bytes;
* from a Hugging Face fast tokenizer's ``offset_mapping``, which counts *characters*:
  :func:`char_to_byte_offsets` turns character ``i`` into ``len(text[:i].encode("utf-8"))``.
  Tokens that split one character all get that whole character's span, so they share one end;
  the group then closes after the last of them. What is lost is only a boundary inside a
  character, where both sides happen to split it at the same byte; use the exact path to keep
  those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """One aligned group: token index ranges ``[start, stop)`` on each side, and the byte offset
    ``end`` where both sides' last tokens end."""

    teacher: tuple[int, int]
    student: tuple[int, int]
    end: int


def char_to_byte_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character ``(start, end)`` spans of ``text`` → the same spans in UTF-8 bytes."""
    prefix = [0]
    for ch in text:
        prefix.append(prefix[-1] + len(ch.encode("utf-8")))
    return [(prefix[a], prefix[b]) for a, b in offsets]


def _last_index_per_end(ends: Sequence[int], side: str) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, e in enumerate(ends):
        if i and e < ends[i - 1]:
            raise ValueError(
                f"{side} token ends must not decrease: token {i} ends at byte {e} after"
                f" {ends[i - 1]}; drop special tokens whose offsets are (0, 0) before aligning"
            )
        last[e] = i
    return last


def align(teacher_ends: Sequence[int], student_ends: Sequence[int]) -> list[Group]:
    """The aligned groups of two tokenizations of one text, given the byte offset where each
    token ends (non-decreasing; both must end at the same byte, the text's end).

    A group closes at every byte both sides end a token at, after the *last* token ending there
    on each side, so a zero-length token (a special) or a split character never closes a group
    alone.
    """
    if not teacher_ends or not student_ends:
        if teacher_ends or student_ends:
            raise ValueError("one tokenization is empty and the other is not")
        return []
    last_t = _last_index_per_end(teacher_ends, "teacher")
    last_s = _last_index_per_end(student_ends, "student")
    if teacher_ends[-1] != student_ends[-1]:
        raise ValueError(
            f"the tokenizations cover different text: the teacher's ends at byte"
            f" {teacher_ends[-1]}, the student's at {student_ends[-1]}"
        )
    groups, t0, s0 = [], 0, 0
    for end in sorted(last_t.keys() & last_s.keys()):
        t1, s1 = last_t[end] + 1, last_s[end] + 1
        groups.append(Group((t0, t1), (s0, s1), end))
        t0, s0 = t1, s1
    return groups


def align_offsets(
    text: str,
    teacher_offsets: Sequence[tuple[int, int]],
    student_offsets: Sequence[tuple[int, int]],
    unit: str = "char",
) -> list[Group]:
    """:func:`align` from ``(start, end)`` offsets in characters (``unit="char"``, what a fast
    tokenizer's ``return_offsets_mapping=True`` gives) or in bytes (``unit="byte"``)."""
    if unit == "char":
        teacher_offsets = char_to_byte_offsets(text, teacher_offsets)
        student_offsets = char_to_byte_offsets(text, student_offsets)
    elif unit != "byte":
        raise ValueError(f"unit must be 'char' or 'byte', got {unit!r}")
    return align([e for _, e in teacher_offsets], [e for _, e in student_offsets])


def compared_positions(groups: Sequence[Group], include_last: bool = True) -> tuple[Tensor, Tensor]:
    """The positions whose next-token distributions are compared: the last token of each group,
    on both sides — teacher indices [G], student indices [G].

    Why only there: the logits at position i predict what follows token i, given the text up to
    the end of token i. At a group's last token both models have read exactly the same bytes
    (0 .. ``group.end``), so both predict the continuation of the same text, and their first
    next tokens both start at byte ``group.end`` (one may be longer: the vocabulary map's prefix
    rule is for that). Inside a group the two have read different prefixes, and their
    predictions are about different bytes.

    ``include_last=False`` drops the final group, whose prediction is past the text's end
    (no target to compare against when logits are shifted against labels).
    """
    chosen = groups if include_last else groups[:-1]
    teacher = torch.tensor([g.teacher[1] - 1 for g in chosen], dtype=torch.long)
    student = torch.tensor([g.student[1] - 1 for g in chosen], dtype=torch.long)
    return teacher, student
