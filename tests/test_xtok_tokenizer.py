"""The student's own byte-level BPE tokenizer (kd.causal.xtok.tokenizer) and the bytes each
token stands for (kd.causal.xtok.pieces): trained offline, deterministic, saved and reloaded
through AutoTokenizer, offsets and pieces that spell the text back."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kd.causal.xtok import pieces as P
from kd.causal.xtok.tokenizer import EOS, save, train_byte_bpe

TEXTS = [
    "The river runs past the old mill, 12 times a day.",
    "A young composer wrote 3 songs in the café by the river.",
    "Unbelievable: the museum opened at 9:30 and closed at 17:00!",
] * 5


@pytest.fixture(scope="module")
def tok():
    return train_byte_bpe(TEXTS, vocab_size=300)


def test_trains_to_the_asked_size_with_eos_and_all_bytes(tok) -> None:
    assert len(tok) == 300
    assert tok.eos_token == EOS and tok.eos_token_id == 0  # specials come first
    # All 256 bytes are in the vocabulary, so text never seen in training still encodes,
    # including characters whose bytes the corpus never held.
    text = "日本 ẞ\t~"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_same_texts_give_the_same_files(tmp_path) -> None:
    a = save(train_byte_bpe(TEXTS, vocab_size=300), tmp_path / "a")
    b = save(train_byte_bpe(TEXTS, vocab_size=300), tmp_path / "b")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_saved_folder_loads_through_auto_tokenizer_with_offsets(tok, tmp_path) -> None:
    folder = save(tok, tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(folder)
    text = "the café by the river"
    enc = again(text, return_offsets_mapping=True)
    assert enc["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id
    # Untrimmed offsets: each token starts where the previous one ended (no gap at spaces),
    # except the pieces of one split character, which all repeat its span: é is two tokens.
    offsets = enc["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(b[0] == a[1] or b == a for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets.count((text.index("é"), text.index("é") + 1)) == 2


def test_too_small_a_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="256 bytes"):
        train_byte_bpe(TEXTS, vocab_size=200)
    with pytest.raises(ValueError, match="eos_token"):
        train_byte_bpe(TEXTS, vocab_size=300, special_tokens=("<pad>",))


def test_byte_level_and_sentencepiece_pieces_by_hand() -> None:
    assert P.byte_level_bytes("Ġcaf") == b" caf"  # Ġ is the shifted space (0x20 → U+0120)
    assert P.byte_level_bytes("Ã©") == "é".encode()  # é = C3 A9, each byte its own char
    assert P.byte_level_bytes("Ċ") == b"\n"
    assert P.sentencepiece_bytes("▁the") == b" the"
    assert P.sentencepiece_bytes("<0xE6>") == b"\xe6"


def test_pieces_spell_the_text_back_even_inside_a_character(tok) -> None:
    pieces = P.vocab_pieces(tok)
    assert len(pieces) == len(tok)
    assert pieces[tok.eos_token_id] == EOS  # a special is its name, a str, never bytes
    text = "日本 café"
    ids = tok(text)["input_ids"]
    assert b"".join(pieces[i] for i in ids) == text.encode("utf-8")
    # 日 is 3 bytes the corpus never merged: three tokens, ending at bytes 1, 2, 3.
    assert P.byte_ends(pieces, ids)[:3] == [1, 2, 3]
    assert P.byte_lengths(pieces, [*ids, tok.eos_token_id])[-1] == 0


def test_an_added_plain_token_is_its_text() -> None:
    # Added tokens are stored as written, not through the byte table (" " has no entry there).
    tok = train_byte_bpe(TEXTS, vocab_size=300)
    tok.add_tokens(["hello world"])
    pieces = P.vocab_pieces(tok)
    assert pieces[tok.convert_tokens_to_ids("hello world")] == b"hello world"
