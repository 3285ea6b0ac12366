"""Causal token blocks (kd.causal.tokens): EOS-joined documents cut into full blocks."""

from __future__ import annotations

import pytest
from tiny import word_tokenizer
from transformers import LlamaConfig

from kd.causal import tokens
from kd.data.corpus import Document


def test_pack_joins_with_eos_and_keeps_only_full_blocks() -> None:
    out = tokens.pack([[5, 6, 7], [8], [9, 10]], block=3, eos_id=1)
    # stream: 5 6 7 1 8 1 9 10 1 -> three full blocks, nothing left over
    assert out["input_ids"] == [[5, 6, 7], [1, 8, 1], [9, 10, 1]]
    assert out["attention_mask"] == [[1, 1, 1]] * 3
    assert tokens.pack([[5, 6, 7, 8]], block=3, eos_id=1)["input_ids"] == [
        [5, 6, 7]
    ]  # 8, EOS dropped
    with pytest.raises(ValueError, match="at least 2"):
        tokens.pack([[5]], block=1, eos_id=1)


def test_build_split_checks_both_tokenizers() -> None:
    words = ["the", "cat", "sat", "on", "mat"]
    tok = word_tokenizer(words)
    docs = [Document("a", "the cat sat"), Document("b", "on the mat")]
    ds = tokens.build_split(docs, tok, tok, block=4)
    the, cat, sat, on, mat = (tok.convert_tokens_to_ids(w) for w in words)
    eos = tok.eos_token_id
    assert ds["input_ids"] == [[the, cat, sat, eos], [on, the, mat, eos]]
    other = word_tokenizer(["cat", "the", "sat", "on", "mat"])  # same words, other ids
    with pytest.raises(SystemExit, match="disagree on document 'a'"):
        tokens.build_split(docs, tok, other, block=4)
    with pytest.raises(SystemExit, match="EOS"):
        tokens.build_split(docs, word_tokenizer(words, eos=False), tok, block=4)
    with pytest.raises(SystemExit, match="hold 8 tokens, fewer than one block of causal.block_si"):
        tokens.build_split(docs, tok, tok, block=100)


def test_a_split_with_fewer_blocks_than_asked_is_refused_exactly_enough_is_not() -> None:
    """Training would loop over the few blocks there are, silently (issue 23)."""
    tok = word_tokenizer(["the", "cat", "sat", "on", "mat"])
    docs = [Document("a", "the cat sat"), Document("b", "on the mat")]  # 2 blocks of 4
    assert len(tokens.build_split(docs, tok, tok, block=4, max_blocks=2)) == 2
    with pytest.raises(SystemExit) as err:
        tokens.build_split(docs, tok, tok, block=4, max_blocks=3, key="causal.train_blocks")
    says = str(err.value)
    assert says.startswith("causal.train_blocks=3 asks for 3 blocks, but the split's 2 document(s)")
    assert "only 2 block(s) of causal.block_size=4" in says
    assert "lower causal.train_blocks to at most 2" in says and "corpus.n_docs" in says


def test_a_padded_vocabulary_is_fine_a_short_one_is_not() -> None:
    tok = word_tokenizer(["a", "b"])  # 4 tokens
    assert tokens.vocabulary_problem(tok, LlamaConfig(vocab_size=64)) is None
    assert "only 3" in tokens.vocabulary_problem(tok, LlamaConfig(vocab_size=3))
