"""Token blocks for causal LMs: documents joined with EOS and cut into full blocks.

No masking and no [CLS]/[SEP] framing: a causal LM learns every next token. Each document's
tokens (checked equal under the teacher's and the student's tokenizers, as for the MLM family:
``kd.data.tokens.tokenize_both``) are followed by the EOS token and concatenated in order; the
stream is cut into blocks of ``block`` tokens and the last, partial block is dropped, so every
block is full and its attention mask is all ones (what the teacher cache's row alignment and
the packed fast paths rely on).
"""

from __future__ import annotations

from datasets import Dataset

from kd.data.corpus import Document
from kd.data.tokens import tokenize_both


def pack(ids: list[list[int]], block: int, eos_id: int) -> dict[str, list[list[int]]]:
    """``input_ids`` and ``attention_mask`` of the full blocks of the EOS-joined documents."""
    if block < 2:
        raise ValueError(f"a causal block needs at least 2 tokens, got {block}")
    stream = [tok for doc in ids for tok in (*doc, eos_id)]
    n = len(stream) // block
    blocks = [stream[i * block : (i + 1) * block] for i in range(n)]
    return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks]}


def build_split(docs: list[Document], teacher_tok, student_tok, block: int,
                max_blocks: int | None = None, chunk: int = 256, key: str = "max_blocks"
                ) -> Dataset:  # fmt: skip
    """One split's first ``max_blocks`` blocks (all when None); refuses tokenizers that
    disagree, or have no EOS token, and a split with no block or fewer than ``max_blocks``
    (``key`` names that param in the message: training would loop over the few it has).
    Documents are tokenized ``chunk`` at a time and only until the blocks are there: the first
    n blocks of a prefix of the stream are the stream's."""
    eos = teacher_tok.eos_token_id
    if eos is None or eos != student_tok.eos_token_id:
        raise SystemExit(
            f"causal packing joins documents with the EOS token: the teacher's tokenizer has "
            f"{eos!r}, the student's {student_tok.eos_token_id!r}; give both the same tokenizer"
        )
    ids: list[list[int]] = []
    n_tokens = 0
    for start in range(0, len(docs), chunk):
        part = tokenize_both(docs[start : start + chunk], teacher_tok, student_tok)["ids"]
        ids.extend(part)
        n_tokens += sum(len(d) + 1 for d in part)
        if max_blocks is not None and n_tokens >= max_blocks * block:
            break
    packed = pack(ids, block, eos)
    n = len(packed["input_ids"])
    more = ("sample more text (corpus.n_docs / corpus.n_words, a larger corpus, or "
            "corpus.test_fraction for the test split)")  # fmt: skip
    if not n:
        raise SystemExit(
            f"the split's {len(docs)} document(s) hold {n_tokens} tokens, fewer than one block of "
            f"causal.block_size={block}: no full block to train on; lower causal.block_size, or "
            f"{more}"
        )
    if max_blocks is not None and n < max_blocks:
        raise SystemExit(
            f"{key}={max_blocks} asks for {max_blocks} blocks, but the split's {len(docs)} "
            f"document(s) pack into only {n} block(s) of causal.block_size={block} tokens: "
            f"lower {key} to at most {n} (null takes every block), or {more}"
        )
    if max_blocks is not None:
        packed = {k: v[:max_blocks] for k, v in packed.items()}
    return Dataset.from_dict(packed)


def vocabulary_problem(tokenizer, config) -> str | None:
    """Why ``tokenizer`` cannot feed a model with ``config``, or None. A model's vocabulary may
    be padded beyond the tokenizer's (to a multiple of 64 or 128, for the matmul kernels); the
    reverse would index past the embedding table."""
    if len(tokenizer) > config.vocab_size:
        return (
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table only "
            f"{config.vocab_size} (vocab_size): use the model's own tokenizer"
        )
    return None
