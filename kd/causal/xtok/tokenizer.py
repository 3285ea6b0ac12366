"""Train a byte-level BPE tokenizer offline, for a student that does not share the teacher's.

Byte-level (GPT-2 style, Radford et al. 2019): the pre-tokenizer maps every UTF-8 byte to one of
256 printable characters before BPE runs, and the 256 of them are seeded into the vocabulary, so
any text encodes without an unknown token and every token stands for a fixed byte string
(:mod:`kd.causal.xtok.pieces`). Nothing is downloaded: the ``tokenizers`` trainer runs on the
texts given, and the result is a ``transformers.PreTrainedTokenizerFast`` so ``save_pretrained``,
``AutoTokenizer.from_pretrained(folder)`` and ``return_offsets_mapping=True`` work as for any
hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_byte_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (EOS,),
    eos_token: str = EOS,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` ids (specials first, then the 256 bytes, then
    merges) trained on ``texts``; the same texts give the same vocabulary and merges, byte for
    byte.

    ``add_prefix_space=False`` keeps the text as given: a leading space the tokenizer invents would
    make the offsets disagree with the text's bytes, which the alignment relies on. The
    post-processor keeps offsets untrimmed for the same reason: the default trims a token's leading
    space out of its span, leaving gaps between tokens.
    """
    if eos_token not in special_tokens:
        raise ValueError(f"eos_token {eos_token!r} must be one of special_tokens {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(special_tokens) + len(alphabet)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(special_tokens)} special tokens + 256 bytes"
            f" = {smallest} every byte-level vocabulary holds"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        # Seeding all 256 bytes means a byte unseen in training still has an id.
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token)


def save(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """Write ``tokenizer`` where ``AutoTokenizer.from_pretrained(folder)`` reads it back."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder
