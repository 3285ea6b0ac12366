"""Seeded random BERTs and Llamas small enough for unit tests (one factory each for every test
file)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM


def tiny_bert(
    hidden: int, layers: int, seed: int, vocab: int, intermediate: int | None = None, **config
) -> BertForMaskedLM:
    """A BertForMaskedLM with 2 heads (unless ``num_attention_heads`` is given), seeded."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate or 2 * hidden,
        **{"num_attention_heads": 2, **config},
    )
    return BertForMaskedLM(cfg)



def tiny_llama(layers: int = 4, vocab: int = 64, seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    """A LlamaForCausalLM of width 16 with 2 query heads sharing 1 key/value head, seeded."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def word_tokenizer(words: list[str], eos: bool = True):
    """A word-level fast tokenizer over ``words`` (ids 2…), with <unk> = 0 and </s> = 1 (the EOS
    token unless ``eos`` is False)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def mlm_loss_and_grads(model, ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One masked-LM forward/backward with the ids as labels: (loss, every parameter's grad)."""
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

# Three topics with disjoint vocabularies (single word pieces in the default BERT vocabulary):
# any encoder that keeps token identity separates them, so a probe must score high on them.
TOPICS = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach"],
    "music": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "song", "harp"],
    "nature": ["river", "mountain", "forest", "valley", "ocean", "desert", "island", "lake"],
}


def topic_texts(per_class: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``per_class`` distinct texts of 4-12 words per topic, and their topic indices."""
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for label, words in enumerate(TOPICS.values()):
        seen: set[str] = set()
        while len(seen) < per_class:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return texts, labels


def topic_folder(path, per_class: int = 30, seed: int = 0):
    """``path/<topic>/<i>.txt``, the probe's folder layout; returns ``path``."""
    from pathlib import Path

    path = Path(path)
    texts, labels = topic_texts(per_class, seed)
    names = list(TOPICS)
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        folder = path / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return path


def causal_blocks(n: int = 12, length: int = 12, vocab: int = 32) -> torch.Tensor:
    """[n, length] token ids of full blocks for a tiny causal LM (fixed seed)."""
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def write_causal_cache(path, k: int = 8) -> None:
    """The teacher cache of :func:`causal_blocks` under ``tiny_llama(4, 32, seed=0)``."""
    from datasets import Dataset

    from kd.causal import cache

    data = causal_blocks()
    ds = Dataset.from_dict({"input_ids": data.tolist(),
                            "attention_mask": torch.ones_like(data).tolist()})  # fmt: skip
    cache.write(tiny_llama(layers=4, vocab=32, seed=0), ds, path, k=k)
