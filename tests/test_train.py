"""The training loop on tiny models: logging, determinism, interruption and resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from datasets import Dataset
from tiny import tiny_bert

from kd.core.params import Scheme, Train
from kd.data.masking import MaskedBlocks, Masking
from kd.data.tokens import pack
from kd.distill.distiller import Distiller
from kd.models import student
from kd.training import checkpoint, flops
from kd.training.loop import (
    NonFiniteLoss,
    batch_indices,
    steps_per_epoch,
    total_steps,
    train,
)

MULTI = Scheme(terms={"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logit": 1.0})
LOGIT = Scheme(terms={"logit": 1.0})
VOCAB = 60


class FakeRun:
    run_id = None

    def __init__(self, stop_at: int | None = None):
        self.logged: list[tuple[int, dict]] = []
        self.stop_at = stop_at

    def log_metrics(self, metrics, step=None):
        if self.stop_at is not None and step >= self.stop_at:
            raise KeyboardInterrupt  # what Ctrl-C looks like from inside the loop
        self.logged.append((step, dict(metrics)))


def tiny(hidden, layers, seed):
    return tiny_bert(hidden, layers, seed, VOCAB)


@pytest.fixture(scope="module")
def ds():
    g = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(5, VOCAB, (int(n),), generator=g).tolist()
        for n in torch.randint(3, 30, (40,), generator=g)
    ]
    cols = pack(docs, 16, cls_id=1, sep_id=2, pad_id=0)
    cols["mlm_input_ids"] = cols["input_ids"]
    cols["mlm_labels"] = cols["input_ids"]
    return Dataset.from_dict({k: v.tolist() for k, v in cols.items()})


def run_train(ds, tmp_path, scheme=MULTI, run=None, resume=None, **cfg):
    cfg = Train(
        **{
            "batch_size": 4,
            "max_steps": 12,
            "log_every": 2,
            "checkpoint_every": 4,
            "warmup_steps": 2,
            "lr": 1e-3,
            **cfg,
        }
    )
    teacher = tiny(24, 3, seed=1)
    d = Distiller(tiny(16, 2, seed=2), teacher, scheme)
    run = run or FakeRun()
    result = train(
        d,
        teacher,
        MaskedBlocks(ds, Masking("dynamic", 3, VOCAB, 0.15)),
        cfg,
        seed=3,
        precision="fp32",
        device=torch.device("cpu"),
        flops_of=flops.StepFlops(d, teacher.config),
        run=run,
        ckpt_dir=tmp_path / "ckpt",
        fingerprint="fp",
        resume=resume,
    )
    return d, result, run


def test_logs_every_term_and_per_layer_grad_norms(ds, tmp_path):
    _, result, run = run_train(ds, tmp_path)
    steps = [s for s, _ in run.logged]
    assert steps == [2, 4, 6, 8, 10, 12]
    row = run.logged[-1][1]
    for key in [
        "loss/embedding",
        "loss/hidden",
        "loss/attention",
        "loss/logit",
        "loss/total",
        "grad_norm/embeddings",
        "grad_norm/layer_0",
        "grad_norm/layer_1",
        "grad_norm/head",
        "grad_norm/projections",
        "grad_norm/global",
        "grad_norm/clipped",
        "lr",
        "tokens",
        "flops",
        "time/seconds",  # MLflow only: the rows (and the CSV made of them) hold results
    ]:
        assert key in row and math.isfinite(row[key]), key
    assert "time/seconds" not in result.rows[-1] and "seconds" not in result.summary
    assert result.timing["seconds"] > 0 and result.timing["tokens_per_s"] > 0
    # FLOPs grow with the steps: one step's count over two logged steps.
    flops = [r["flops"] for r in result.rows]
    assert all(b > a for a, b in zip(flops, flops[1:], strict=False))
    assert row["grad_norm/clipped"] <= 1.0 + 1e-6
    assert result.summary["steps"] == 12
    assert result.summary["mean/grad_norm/layer_0"] > 0
    # The weighted total is the sum of the unweighted terms when all weights are 1.
    terms = sum(row[f"loss/{t}"] for t in ("embedding", "hidden", "attention", "logit"))
    assert row["loss/total"] == pytest.approx(terms, rel=1e-5)


def test_logit_arm_logs_no_projection_norm(ds, tmp_path):
    _, _, run = run_train(ds, tmp_path, scheme=LOGIT, max_steps=2)
    assert "grad_norm/projections" not in run.logged[-1][1]
    assert set(k for k in run.logged[-1][1] if k.startswith("loss/")) == {
        "loss/logit",
        "loss/total",
    }


def test_same_seed_same_weights_bit_identical(ds, tmp_path):
    a, ra, _ = run_train(ds, tmp_path / "a", max_steps=6)
    b, rb, _ = run_train(ds, tmp_path / "b", max_steps=6)
    assert student.weights_hash(a.student) == student.weights_hash(b.student)
    assert [r["loss/total"] for r in ra.rows] == [r["loss/total"] for r in rb.rows]


def _interrupt_inside_step(monkeypatch, at_update: int) -> None:
    """Ctrl-C (a real SIGINT) right after AdamW's ``at_update``-th update, before the training
    loop has counted that step: the worst moment for a checkpoint."""
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_update:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def _interrupt_between_steps(at_step: int):
    """A run handle that sends SIGINT while the loop logs step ``at_step``."""

    class Run(FakeRun):
        def log_metrics(self, metrics, step=None):
            super().log_metrics(metrics, step)
            if step == at_step:
                os.kill(os.getpid(), signal.SIGINT)

    return Run()


@pytest.mark.parametrize("where", ["between steps", "inside a step"])
def test_interrupted_run_resumes_to_the_same_result(ds, tmp_path, monkeypatch, where):
    whole, r_whole, _ = run_train(ds, tmp_path / "whole")
    with monkeypatch.context() as m:
        if where == "inside a step":
            _interrupt_inside_step(m, at_update=6)  # the update of step 6 (1-based) is applied
            cut = None
        else:
            cut = _interrupt_between_steps(6)
        with pytest.raises(SystemExit, match="interrupted at step 6"):
            run_train(ds, tmp_path / "cut", run=cut)
    state = checkpoint.load(tmp_path / "cut" / "ckpt", "fp")
    # The checkpoint holds six applied updates under step 6: none is applied twice on resume.
    assert state is not None and state["step"] == 6
    resumed, r_resumed, run = run_train(ds, tmp_path / "cut", resume=state)
    assert [s for s, _ in run.logged] == [8, 10, 12]  # continues at the right step
    assert student.weights_hash(resumed.student) == student.weights_hash(whole.student)
    assert r_resumed.rows == r_whole.rows  # every logged value: the rows hold no wall time
    assert r_resumed.summary == r_whole.summary


def test_a_second_interrupt_stops_at_once_and_saves_nothing(ds, tmp_path, monkeypatch):
    real, calls = torch.optim.AdamW.step, {"n": 0}
    # What the process had: Python's default, or SIG_IGN when a non-interactive shell started
    # it in the background (`cmd &` ignores SIGINT there).
    before = signal.getsignal(signal.SIGINT)

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # two signals inside the same step
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit, match="interrupted again during step 3: nothing saved"):
        run_train(ds, tmp_path)
    # Nothing was written mid-step; no periodic checkpoint (every 4 steps) was reached yet.
    assert checkpoint.load(tmp_path / "ckpt", "fp") is None
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_checkpoint_from_other_params_is_ignored(tmp_path):
    checkpoint.save(tmp_path, {"fingerprint": "old", "step": 3})
    assert checkpoint.load(tmp_path, "new") is None
    assert checkpoint.load(tmp_path, "old")["step"] == 3


def test_data_order_is_a_fresh_permutation_each_epoch():
    n, bs = 10, 3
    per = steps_per_epoch(n, bs)
    epoch0 = [i for s in range(per) for i in batch_indices(n, bs, 0, s)]
    epoch1 = [i for s in range(per, 2 * per) for i in batch_indices(n, bs, 0, s)]
    assert len(set(epoch0)) == len(epoch0) == per * bs  # no block twice within an epoch
    assert epoch0 != epoch1
    assert batch_indices(n, bs, 0, 4) == batch_indices(n, bs, 0, 4)


def test_total_steps_from_epochs():
    assert total_steps(Train(batch_size=4, epochs=1.0), 41) == 10
    assert total_steps(Train(batch_size=4, epochs=2.5), 41) == 25
    assert total_steps(Train(batch_size=4, max_steps=7), 41) == 7
    with pytest.raises(SystemExit, match="fewer than train.batch_size"):
        total_steps(Train(batch_size=64), 41)


def test_non_finite_loss_stops_with_step_and_term(ds, tmp_path, monkeypatch):
    import kd.distill.losses

    real = kd.distill.losses.hidden_mse
    monkeypatch.setattr(kd.distill.losses, "hidden_mse", lambda s, t, m: real(s, t, m) * float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"step 0 .*embedding, loss/hidden"):
        run_train(ds, tmp_path)


def test_resume_fingerprint_follows_the_data_and_the_mask_rate(tmp_path):
    """A checkpoint is continued only under the same inputs: the train tokens' content (not
    only their schema), every file of the teacher, and the mask rate."""
    from kd.core.params import parse_params
    from stages.train import resume_fingerprint

    teacher, tokens = tmp_path / "teacher", tmp_path / "tokens" / "train"
    tokens.mkdir(parents=True)
    teacher.mkdir()
    (tokens / "dataset_info.json").write_text("{}")  # the schema: the same whatever the data
    (tokens / "data-00000-of-00001.arrow").write_bytes(b"blocks")
    (teacher / "model-00001-of-00002.safetensors").write_bytes(b"shard 1")
    (teacher / "model-00002-of-00002.safetensors").write_bytes(b"shard 2")
    p = parse_params({"paths": {"teacher": str(teacher), "tokens": str(tmp_path / "tokens")},
                      "loss": {"schemes": {"logit": {"terms": {"logit": 1.0}}},
                               "arms": ["logit"], "scheme": "logit"}})
    masking = Masking("dynamic", 103, 30522, 0.15)
    base = resume_fingerprint(p, "logit", masking, "init")
    assert resume_fingerprint(p, "logit", masking, "init") == base
    assert resume_fingerprint(p, "logit", Masking("dynamic", 103, 30522, 0.2), "init") != base
    (tokens / "data-00000-of-00001.arrow").write_bytes(b"other blocks")
    assert resume_fingerprint(p, "logit", masking, "init") != base
    (tokens / "data-00000-of-00001.arrow").write_bytes(b"blocks")
    (teacher / "model-00002-of-00002.safetensors").write_bytes(b"shard 2, retrained")
    assert resume_fingerprint(p, "logit", masking, "init") != base
