"""A map from teacher token ids to student token ids, by the bytes each token stands for.

Rules, tried in order for each teacher token t (its piece: :mod:`kd.causal.xtok.pieces`):

1. **exact**: a student token with the same piece (same bytes; a special token matches the
   special of the same name), or a pair given in ``pinned`` (say, the two EOS tokens);
2. **prefix** (``prefix=True``): the student token whose bytes are the longest prefix of t's
   bytes, at least ``min_prefix_bytes`` long. It is the student's first step towards spelling t:
   at an aligned boundary (:func:`kd.causal.xtok.align.compared_positions`) the teacher's next
   token t and the student's next token both start at the same byte, so the student token that
   begins t is where the teacher's mass on t belongs. A byte-level student has every single
   byte, so with this rule every non-empty teacher byte string maps somewhere;
3. **leftover**: everything else (specials without a twin, empty pieces); id −1, one bucket.

Several teacher tokens can map to one student token; the losses add their mass.
The map is dense, one entry per teacher id, so projecting a cached top-k is one gather.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kd.causal.xtok.pieces import Piece, vocab_pieces

RULES = ("exact", "prefix", "leftover")
EXACT, PREFIX, LEFTOVER = range(3)
LEFTOVER_ID = -1

# Token classes for the coverage report, decided on the decoded string (see token_class).
CLASSES = ("number", "whitespace", "punctuation", "word", "rare")
_PUNCT = set(string.punctuation)


@dataclass(frozen=True)
class VocabMap:
    """``student_ids`` [V_teacher] the student id of each teacher id, −1 for the leftover
    bucket; ``rule`` [V_teacher] which rule matched (index into ``RULES``); ``token_class``
    [V_teacher] the teacher token's class (index into ``CLASSES``); ``teacher_pieces`` for
    reports; ``student_size`` the student's vocabulary size."""

    student_ids: Tensor
    rule: Tensor
    token_class: Tensor
    teacher_pieces: tuple[Piece, ...]
    student_size: int

    def counts(self) -> dict[str, int]:
        """How many teacher ids each rule matched."""
        return {name: int((self.rule == r).sum()) for r, name in enumerate(RULES)}


def token_class(piece: Piece) -> int:
    """The class of a token by its decoded string, an optional leading space aside ("Ġ12" is a
    number): all ASCII digits → number; all whitespace → whitespace; all ASCII punctuation →
    punctuation; all ASCII letters → word; anything else → rare (specials, bytes that are not
    whole UTF-8 characters, non-ASCII text, mixes such as "'s" or "a1")."""
    if isinstance(piece, str) or not piece:
        return CLASSES.index("rare")
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return CLASSES.index("rare")
    if text.isspace():
        return CLASSES.index("whitespace")
    core = text[1:] if text.startswith(" ") else text
    if core.isascii() and core.isdigit():
        return CLASSES.index("number")
    if core and all(c in _PUNCT for c in core):
        return CLASSES.index("punctuation")
    if core.isascii() and core.isalpha():
        return CLASSES.index("word")
    return CLASSES.index("rare")


def build_vocab_map(
    teacher_pieces: Sequence[Piece],
    student_pieces: Sequence[Piece],
    *,
    prefix: bool = True,
    min_prefix_bytes: int = 1,
    pinned: Mapping[int, int] | None = None,
) -> VocabMap:
    """The map from two vocabularies' pieces (index = token id). Where several student ids share
    a piece the lowest wins, so the map is a function of the vocabularies alone."""
    if min_prefix_bytes < 1:
        raise ValueError(f"min_prefix_bytes must be >= 1, got {min_prefix_bytes}")
    by_piece: dict[Piece, int] = {}
    for sid, piece in enumerate(student_pieces):
        if piece:
            by_piece.setdefault(piece, sid)
    pinned = dict(pinned or {})
    for tid, sid in pinned.items():
        if not (0 <= tid < len(teacher_pieces) and 0 <= sid < len(student_pieces)):
            raise ValueError(f"pinned pair {tid} -> {sid} is outside the vocabularies")

    ids, rules = [], []
    for tid, piece in enumerate(teacher_pieces):
        sid, rule = LEFTOVER_ID, LEFTOVER
        if tid in pinned:
            sid, rule = pinned[tid], EXACT
        elif piece and piece in by_piece:
            sid, rule = by_piece[piece], EXACT
        elif prefix and isinstance(piece, bytes):
            for n in range(len(piece) - 1, min_prefix_bytes - 1, -1):
                if piece[:n] in by_piece:
                    sid, rule = by_piece[piece[:n]], PREFIX
                    break
        ids.append(sid)
        rules.append(rule)
    return VocabMap(
        student_ids=torch.tensor(ids, dtype=torch.long),
        rule=torch.tensor(rules, dtype=torch.long),
        token_class=torch.tensor([token_class(p) for p in teacher_pieces], dtype=torch.long),
        teacher_pieces=tuple(teacher_pieces),
        student_size=len(student_pieces),
    )


def _padded(pieces: list[Piece], size: int | None, side: str) -> list[Piece]:
    if size is None:
        return pieces
    if size < len(pieces):
        raise ValueError(f"{side}_size {size} is below the tokenizer's {len(pieces)} ids")
    return pieces + [""] * (size - len(pieces))


def vocab_map(
    teacher_tokenizer,
    student_tokenizer,
    *,
    pin_eos: bool = True,
    teacher_size: int | None = None,
    student_size: int | None = None,
    **rules,
) -> VocabMap:
    """:func:`build_vocab_map` from two Hugging Face fast tokenizers; ``pin_eos`` maps the
    teacher's EOS to the student's whatever their names, since both mean "the text ends".

    ``teacher_size`` / ``student_size``: the models' logit widths where they exceed the
    tokenizers' (embeddings padded to a multiple of 64 or 128); the padding ids stand for
    nothing, so a teacher one is leftover and a student one is never a target.
    """
    pinned = dict(rules.pop("pinned", None) or {})
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if pin_eos and t_eos is not None and s_eos is not None:
        pinned.setdefault(t_eos, s_eos)
    return build_vocab_map(
        _padded(vocab_pieces(teacher_tokenizer), teacher_size, "teacher"),
        _padded(vocab_pieces(student_tokenizer), student_size, "student"),
        pinned=pinned,
        **rules,
    )
