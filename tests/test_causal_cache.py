"""The teacher cache (kd.causal.cache): top-k next-token supports written once in shards that
survive a kill, split across ranks, compact, self-checked, and refused when computed from other
inputs; read per batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny import tiny_llama

from kd.causal import cache
from kd.causal import divergences as D
from kd.causal.students import from_teacher_layers
from kd.core.io import dir_digest

ROOT = Path(__file__).resolve().parents[1]
COMPUTE_SHARD = cache._compute_shard


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
    assert meta["identity"] == cache.identity(None, None, 64, 2.0, "fp32", "float32")
    assert (meta["rows"], meta["rest"], meta["ran_precision"]) == (5, False, "fp32")
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
    assert ref["ran_precision"] == "fp32" and meta["identity"]["precision"] == "bf16"
    assert meta["ran_precision"] == effective_precision(torch.device("cpu"), "bf16")
    a = cache.Cache(tmp_path / "fp32").support(slice(0, 5))
    b = cache.Cache(tmp_path / "bf16").support(slice(0, 5))
    assert b.logprobs.dtype == torch.float32
    assert torch.allclose(b.logprobs, a.logprobs, atol=0.05)
    if meta["ran_precision"] == "bf16":
        assert not torch.equal(b.logprobs, a.logprobs)  # the blocks did run in bf16


def test_ids_take_the_smallest_type_and_a_compact_k64_position_fits_260_bytes() -> None:
    assert cache.id_dtype(64) == np.uint8 and cache.id_dtype(256) == np.uint8
    assert cache.id_dtype(49_152) == np.uint16 and cache.id_dtype(151_936) == np.uint32
    assert cache.bytes_per_position(64, 49_152, "float16") == 258  # the old store: 516
    assert cache.bytes_per_position(64, 49_152, "float32") == 388


def test_the_compact_store_adds_under_1e_3_nats_against_float32(tokens, tmp_path) -> None:
    teacher = tiny_llama(seed=0)
    student = from_teacher_layers(teacher, [0, 3])
    for dtype in ("float32", "float16"):
        cache.write(teacher, tokens, tmp_path / dtype, k=8, dtype=dtype, shard_blocks=2)
    exact = cache.Cache(tmp_path / "float32").support(slice(0, 5))
    small = cache.Cache(tmp_path / "float16")
    assert (
        np.load(tmp_path / "float16/shards/0000000000-0000000002/logprobs.npy").dtype == np.float16
    )
    compact = small.support(slice(0, 5))
    assert torch.equal(compact.ids, exact.ids) and compact.logprobs.dtype == torch.float32
    # The stored distribution (k tokens and the rest bin): KL(float32 store ‖ compact store).
    p, q = exact.support(), compact.support()
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() < 1e-3, kl.max()
    assert torch.allclose(q.logsumexp(-1), torch.zeros(len(q)), atol=1e-6)  # renormalised
    # And the distillation loss a student sees, per position.
    s_logits = _logits(student, tokens, slice(0, 5))
    a = D.per_position(s_logits, exact, D.forward_kl)
    b = D.per_position(s_logits, compact, D.forward_kl)
    assert (a - b).abs().max() < 1e-3


def _stop_at_shard(monkeypatch, n: int) -> list[int]:
    """Make the n-th shard computation die half-way through writing its files (a kill)."""
    real, calls = COMPUTE_SHARD, []

    def dying(teacher, tokens, start, end, folder, **kw):
        calls.append(start)
        if len(calls) == n:
            folder.mkdir()
            (folder / "ids.npy").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real(teacher, tokens, start, end, folder, **kw)

    monkeypatch.setattr(cache, "_compute_shard", dying)
    return calls


def test_a_killed_run_continues_after_its_last_shard_and_gives_the_same_bytes(
    tokens, tmp_path, monkeypatch
) -> None:
    teacher = tiny_llama(seed=0)
    kw = {"k": 8, "batch_size": 2, "dtype": "float16", "shard_blocks": 2}
    cache.write(teacher, tokens, tmp_path / "whole", **kw, work=tmp_path / "w1")
    calls = _stop_at_shard(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        cache.write(teacher, tokens, tmp_path / "resumed", **kw, work=tmp_path / "w2")
    assert not (tmp_path / "resumed").exists()  # nothing under the out's name before the end
    assert cache.finished_shards(tmp_path / "w2") == 2  # the half-written one is not finished
    calls = _stop_at_shard(monkeypatch, 99)
    cache.write(teacher, tokens, tmp_path / "resumed", **kw, work=tmp_path / "w2")
    assert calls == [4]  # only the last shard ran again
    assert dir_digest(tmp_path / "resumed") == dir_digest(tmp_path / "whole")
    assert not (tmp_path / "w2").exists()  # the side folder goes once the cache is whole


def test_shards_of_other_inputs_are_not_resumed(tokens, tmp_path, monkeypatch) -> None:
    teacher = tiny_llama(seed=0)
    kw = {"batch_size": 2, "shard_blocks": 2, "work": tmp_path / "w"}
    _stop_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        cache.write(teacher, tokens, tmp_path / "c", k=8, **kw)
    calls = _stop_at_shard(monkeypatch, 99)
    cache.write(teacher, tokens, tmp_path / "c", k=4, **kw)  # another k: all three shards anew
    assert calls == [0, 2, 4]
    assert cache.Cache(tmp_path / "c").support(slice(0, 5)).ids.shape == (40, 4)


def test_a_cache_from_other_inputs_is_refused_with_the_difference(tokens, tmp_path) -> None:
    ident = cache.identity("t" * 64, "a" * 64, 8, 1.0, "fp32", "float16")
    cache.write(tiny_llama(seed=0), tokens, tmp_path / "c", k=8, dtype="float16",
                sources={"teacher": "t" * 64, "tokens": "a" * 64})  # fmt: skip
    assert len(cache.Cache(tmp_path / "c", expect=ident)) == 5
    with pytest.raises(
        SystemExit, match=r"tokens 'aaa.*' where the inputs give 'bbb.*causal_cache"
    ):
        cache.Cache(tmp_path / "c", expect={**ident, "tokens": "b" * 64})
    with pytest.raises(SystemExit, match="dtype 'float16' where the inputs give 'float32'"):
        cache.Cache(tmp_path / "c", expect={**ident, "dtype": "float32"})


def test_an_old_format_cache_is_refused(tmp_path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / cache.META).write_text('{"k": 8, "rows": 5}')
    with pytest.raises(SystemExit, match="older format"):
        cache.Cache(tmp_path / "c")


def test_the_self_check_fires_on_rows_shifted_by_one_position(
    tokens, tmp_path, monkeypatch
) -> None:
    # The planted bug: the support of the positions 1…L−1 (each predicts the token after next)
    # stored as if it were 0…L−2's.
    monkeypatch.setattr(cache, "_predicting", lambda hidden: hidden[:, 1:])
    with pytest.raises(cache.AlignmentError, match="misaligned"):
        cache.write(tiny_llama(seed=0), tokens, tmp_path / "c", k=8, shard_blocks=2)
    assert not (tmp_path / "c").exists()
    assert cache.finished_shards(tmp_path / ".c.work") == 0


@pytest.mark.slow
@pytest.mark.long
def test_two_ranks_write_the_same_cache_as_one(tmp_path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WORLD_SIZE", None)
    worker = str(ROOT / "tests" / "cache_worker.py")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    for cmd, out in (([sys.executable, worker], "one"),
                     ([torchrun, "--standalone", "--nproc-per-node=2", worker], "two")):  # fmt: skip
        proc = subprocess.run([*cmd, str(tmp_path / out)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(cache.Cache(tmp_path / "two" / "cache")) == 7  # 4 shards, 2 per rank
    assert dir_digest(tmp_path / "one" / "cache") == dir_digest(tmp_path / "two" / "cache")
