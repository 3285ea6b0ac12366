"""Which bytes each token id stands for: the unit two tokenizers can be compared in.

A *piece* is a token's text as UTF-8 bytes, or, for a special token (EOS, BOS, padding), its
name as a ``str``: a special token stands for no text, and keeping it a ``str`` means it can
equal the same-named special of another tokenizer but never a byte string (``b"</s>" != "</s>"``).

Three tokenizer families are read exactly:

* byte-level BPE (GPT-2, Llama 3, Qwen, :mod:`kd.causal.xtok.tokenizer`): each character of the
  token string is one byte through GPT-2's ``bytes_to_unicode`` table, so a token can be part of
  a multi-byte character;
* SentencePiece style (Llama 2, Mistral, Gemma): ``▁`` is a space and ``<0xNN>`` one raw byte;
* anything else falls back to ``tokenizer.decode([id])``, which is right for whole-character
  tokens only (a lone partial byte decodes to U+FFFD).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache

Piece = bytes | str

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable bytes stand for themselves, the
    other 68 are shifted to U+0100.. so no byte maps to whitespace or a control character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = dict.fromkeys(printable)
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + shifted
            shifted += 1
    return {chr(c if c is not None else b): b for b, c in chars.items()}


def byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token string stands for (``"Ġcaf"`` → ``b" caf"``)."""
    table = _byte_of_char()
    return bytes(table[c] for c in token)


def sentencepiece_bytes(token: str) -> bytes:
    """The bytes a SentencePiece token stands for: ``▁`` → space, ``<0xNN>`` → that byte."""
    m = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(m.group(1), 16)]) if m else token.replace("▁", " ").encode("utf-8")


def _family(tokenizer) -> str:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = json.dumps(spec.get("decoder"))
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if "▁" in decoder or "\\u2581" in decoder or '"ByteFallback"' in decoder:
        return "sentencepiece"
    return "decode"


def vocab_pieces(tokenizer) -> list[Piece]:
    """The piece of every id ``0 .. len(tokenizer) − 1`` of a Hugging Face fast tokenizer."""
    family = _family(tokenizer)
    added = tokenizer.added_tokens_decoder
    specials = set(tokenizer.all_special_ids) | {i for i, a in added.items() if a.special}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    pieces: list[Piece] = []
    for idx, token in enumerate(tokens):
        if token is None:  # a hole in the id range: stands for nothing
            pieces.append("")
        elif idx in specials:
            pieces.append(token)
        elif idx in added:  # an added non-special token is stored as its text, not remapped
            pieces.append(added[idx].content.encode("utf-8"))
        elif family == "byte_level":
            pieces.append(byte_level_bytes(token))
        elif family == "sentencepiece":
            pieces.append(sentencepiece_bytes(token))
        else:
            pieces.append(tokenizer.decode([idx]).encode("utf-8"))
    return pieces


def byte_lengths(pieces: Sequence[Piece], ids: Sequence[int]) -> list[int]:
    """How many bytes of text each token of ``ids`` stands for; 0 for a special token."""
    return [len(p) if isinstance(p, bytes) else 0 for p in (pieces[i] for i in ids)]


def byte_ends(pieces: Sequence[Piece], ids: Sequence[int]) -> list[int]:
    """The byte offset where each token of ``ids`` ends, the running sum of :func:`byte_lengths`:
    exact even where a token ends inside a multi-byte character, which character offsets cannot
    say. Assumes the tokens spell the text with nothing dropped or normalised away."""
    ends, total = [], 0
    for n in byte_lengths(pieces, ids):
        total += n
        ends.append(total)
    return ends
