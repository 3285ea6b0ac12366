"""The causal arms in the one training loop (kd/training/loop.py, with kd/causal/batches.py and
kd/causal/distiller.py): they learn, resume exactly, use the cache, attribute the terms, and the
on-policy rows are the student's own text."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_llama

from kd.causal import cache as kd_cache
from kd.causal import students
from kd.causal.batches import NextTokenBlocks
from kd.causal.distiller import CausalDistiller, layer_map
from kd.core.params import CausalScheme, CausalTrain
from kd.core.tracking import Run
from kd.training import loop
from kd.training.gradnorm import layer_groups

CPU = torch.device("cpu")


def setup(terms: dict, seed: int = 0):
    teacher = tiny_llama(layers=4, vocab=32, seed=seed)
    student = students.from_teacher_layers(teacher, [0, 3])
    scheme = CausalScheme(terms=terms)
    layers = layer_map(scheme, [1, 4], 2, 4)
    return teacher, CausalDistiller(student, 16, scheme, layers)


def blocks(n: int = 12, length: int = 12) -> torch.Tensor:
    return torch.randint(2, 32, (n, length), generator=torch.Generator().manual_seed(0))


def run_train(distiller, teacher, data, cache, cfg, tmp_path, resume=None):
    batches = NextTokenBlocks(data, cache, distiller.student, cfg)
    return loop.train(distiller, teacher, batches, cfg, seed=0, device=CPU, precision="fp32",
                      run=Run(None), ckpt_dir=tmp_path / "ckpt", fingerprint="f",
                      resume=resume)  # fmt: skip


def test_layer_groups_cover_every_parameter_once_and_a_tied_head_under_embeddings() -> None:
    _, d = setup({"logit": 1, "hidden": 1})
    groups = layer_groups(d.student, d.extra_groups())
    assert list(groups) == ["embeddings", "layer_0", "layer_1", "projections", "other"]
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(d.parameters()))


def test_the_auto_layer_map_follows_the_kept_blocks_or_is_uniform() -> None:
    auto = CausalScheme(terms={"logit": 1})
    assert layer_map(auto, [1, 4], 2, 4) == [1, 4]
    assert layer_map(auto, None, 2, 4) == [2, 4]
    assert layer_map(CausalScheme(terms={"logit": 1}, layer_map=[3, 4]), [1, 4], 2, 4) == [3, 4]


class StopAfter:
    """Stands in for kd.training.interrupt.deferred: a stop is asked for after ``n`` steps."""

    def __init__(self, n: int):
        self.n, self.checks = n, 0

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks >= self.n

    def __call__(self):
        import contextlib

        return contextlib.nullcontext(self)


@pytest.mark.parametrize("terms", [{"logit": 1.0}, {"logit": 1, "hidden": 1, "attention": 1,
                                                     "embedding": 1}])  # fmt: skip
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, terms) -> None:
    from kd.training import checkpoint

    teacher, d = setup(terms)
    for m in (teacher, d.student):
        m.set_attn_implementation("eager")
    cfg = CausalTrain(batch_size=3, max_steps=4, warmup_steps=1, log_every=1, checkpoint_every=10,
                      attribution_every=2)  # fmt: skip
    whole, cut = copy.deepcopy(d), copy.deepcopy(d)
    full = run_train(whole, teacher, blocks(), None, cfg, tmp_path)
    # Ctrl-C during step 2: the loop finishes the step, checkpoints it and stops.
    monkeypatch.setattr(loop.interrupt, "deferred", StopAfter(2))
    with pytest.raises(SystemExit, match="interrupted at step 2"):
        run_train(cut, teacher, blocks(), None, cfg, tmp_path)
    monkeypatch.undo()
    saved = checkpoint.load(tmp_path / "ckpt", "f")
    assert saved["step"] == 2
    _, fresh = setup(terms)
    fresh.student.set_attn_implementation("eager")
    resumed = run_train(fresh, teacher, blocks(), None, cfg, tmp_path, resume=saved)
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r["loss/total"] for r in resumed.rows] == [r["loss/total"] for r in full.rows]


def test_the_cache_with_k_equal_to_v_trains_as_the_online_teacher(tmp_path) -> None:
    from datasets import Dataset

    teacher, d = setup({"logit": 1.0})
    data = blocks()
    ds = Dataset.from_dict({"input_ids": data.tolist(),
                            "attention_mask": torch.ones_like(data).tolist()})
    kd_cache.write(teacher, ds, tmp_path / "cache", k=32)
    cfg = CausalTrain(batch_size=3, max_steps=3, warmup_steps=1, log_every=1, checkpoint_every=5)
    online, cached = copy.deepcopy(d), copy.deepcopy(d)
    a = run_train(online, teacher, data, None, cfg, tmp_path / "a")
    b = run_train(cached, None, data, kd_cache.Cache(tmp_path / "cache"), cfg, tmp_path / "b")
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert ra["loss/logit"] == pytest.approx(rb["loss/logit"], rel=1e-5, abs=1e-6)


def test_distillation_lowers_the_logit_loss_and_onpolicy_rows_run(tmp_path) -> None:
    teacher, d = setup({"logit": 1.0})
    cfg = CausalTrain(batch_size=4, max_steps=12, lr=3e-3, warmup_steps=1, log_every=1,
                      checkpoint_every=50)  # fmt: skip
    out = run_train(d, teacher, blocks(16), None, cfg, tmp_path / "a")
    losses = [r["loss/logit"] for r in out.rows]
    assert losses[-1] < losses[0]
    assert {"grad_norm/layer_0", "grad_norm/global", "lr"} <= set(out.rows[0])
    onpolicy = cfg.model_copy(update={"max_steps": 2, "onpolicy": 0.5, "onpolicy_prompt": 4})
    _, d2 = setup({"logit": 1.0})
    res = run_train(d2, teacher, blocks(16), None, onpolicy, tmp_path / "b")
    assert res.summary["steps"] == 2
