"""The teacher cache (kd.causal.cache): top-k next-token supports written once, read per batch."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny import tiny_llama

from kd.causal import cache
from kd.causal import divergences as D
from kd.causal.students import from_teacher_layers


@pytest.fixture(scope="module")
def tokens() -> Dataset:
    ids = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


def _logits(model, tokens, rows):
    ids = torch.tensor(tokens[rows]["input_ids"])
    with torch.no_grad():
        return model(input_ids=ids).logits[:, :-1].flatten(0, 1)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_top_k_over_the_whole_vocabulary_reproduces_the_full_loss(tokens, tmp_path, name) -> None:
    teacher = tiny_llama(seed=0)
    student = from_teacher_layers(teacher, [0, 3])
    meta = cache.write(teacher, tokens, tmp_path / "cache", k=64, temperature=2.0, batch_size=2)
    assert meta == {"k": 64, "temperature": 2.0, "vocab_size": 64, "rows": 5, "rest": False,
                    "precision": "fp32"}  # fmt: skip
    stored = cache.Cache(tmp_path / "cache")
    assert len(stored) == 5
    div = D.divergence(name)
    rows = [1, 3, 4]  # any rows, in any batch: row i of the cache is row i of the tokens
    s_logits = _logits(student, tokens, rows)
    full = D.next_token_loss(s_logits, _logits(teacher, tokens, rows), div, temperature=2.0)
    cached = D.next_token_loss(s_logits, stored.support(rows), div, temperature=2.0)
    assert torch.allclose(cached, full, atol=1e-6), (cached, full)


def test_top_k_keeps_the_teacher_s_best_tokens_and_the_rest_of_the_mass(tokens, tmp_path) -> None:
    teacher = tiny_llama(seed=0)
    cache.write(teacher, tokens, tmp_path / "cache", k=8)
    support = cache.Cache(tmp_path / "cache").support(slice(0, 5))
    online = D.top_k(_logits(teacher, tokens, slice(0, 5)), 8)
    assert support.ids.shape == (5 * 8, 8) and support.rest.shape == (5 * 8,)
    assert torch.equal(support.ids, online.ids)
    assert torch.allclose(support.logprobs, online.logprobs) and torch.allclose(
        support.rest, online.rest
    )
    assert torch.allclose(support.support().logsumexp(-1), torch.zeros(40), atol=1e-5)


def test_a_bad_k_is_refused_and_leaves_nothing(tokens, tmp_path) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        cache.write(tiny_llama(), tokens, tmp_path / "cache", k=65)
    assert not (tmp_path / "cache").exists()


def test_the_pipeline_s_precision_runs_the_blocks_and_keeps_the_head_in_float32(
    tokens, tmp_path
) -> None:
    # base.precision bf16 (where this CPU has it) runs the teacher's blocks under autocast; the
    # head runs in float32, so the stored log-probabilities are float32 and close to the
    # float32 cache's (bf16 rounding of the blocks only), and the metadata says which ran.
    from kd.core.runtime import effective_precision

    teacher = tiny_llama(seed=0)
    ref = cache.write(teacher, tokens, tmp_path / "fp32", k=8)
    meta = cache.write(teacher, tokens, tmp_path / "bf16", k=8, precision="bf16")
    assert ref["precision"] == "fp32"
    assert meta["precision"] == effective_precision(torch.device("cpu"), "bf16")
    a = cache.Cache(tmp_path / "fp32").support(slice(0, 5))
    b = cache.Cache(tmp_path / "bf16").support(slice(0, 5))
    assert b.logprobs.dtype == torch.float32
    assert torch.allclose(b.logprobs, a.logprobs, atol=0.05)
    if meta["precision"] == "bf16":
        assert not torch.equal(b.logprobs, a.logprobs)  # the blocks did run in bf16
