"""prepare_teacher on tiny random BERTs with the real (packaged) tokenizer; no network."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import Dataset
from torch import nn
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertModel

from kd.core.params import Base, Teacher
from kd.data import assets, tokens
from kd.data.corpus import Document
from kd.models import teacher

TINY = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
)
WORDS = (
    "the river flows through an old city where merchants once traded salt wool and silver "
    "before the railway arrived and the harbour silted up leaving quiet streets and churches"
).split()


class Recorder:
    """Stands in for tracking.Run: keeps what would have gone to MLflow."""

    def __init__(self):
        self.rows: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def tokenizer():
    return assets.load_tokenizer("default")


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny headless BERT (like the default teacher), saved with the real tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bare")
    BertModel(BertConfig(**TINY), add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def token_dd(tokenizer):
    docs = [
        Document(id=f"doc{i}", text=" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)))
        for i in range(12)
    ]
    splits = {"train": docs[:9], "test": docs[9:]}
    return tokens.build(splits, tokenizer, tokenizer, 32, 0.15, 1234)


def test_load_teacher_detects_missing_head_and_ties_decoder(bare_dir, tmp_path) -> None:
    model, has_head = teacher.load_teacher(str(bare_dir))
    assert not has_head
    assert isinstance(model, BertForMaskedLM)
    assert teacher.decoder_is_tied(model)

    BertForMaskedLM(BertConfig(**TINY)).save_pretrained(tmp_path)
    _, has_head = teacher.load_teacher(str(tmp_path))
    assert has_head


def test_masked_logits_match_full_logits(bare_dir, token_dd) -> None:
    model, _ = teacher.load_teacher(str(bare_dir))
    model.eval()
    ds = token_dd["train"].with_format("torch")
    ids = ds["mlm_input_ids"][:4].long()
    att = ds["attention_mask"][:4].long()
    labels = ds["mlm_labels"][:4].long()
    logits, targets = teacher.masked_logits(model, ids, att, labels)
    full = model(input_ids=ids, attention_mask=att).logits
    where = labels != -100
    torch.testing.assert_close(logits, full[where], rtol=1e-4, atol=1e-4)
    assert torch.equal(targets, labels[where])


def test_adapt_overfits_one_batch(bare_dir, token_dd, tokenizer) -> None:
    model, _ = teacher.load_teacher(str(bare_dir))
    one = token_dd["train"].select(range(4))  # batch_size == split size: one batch, reshuffled
    device = torch.device("cpu")
    before = teacher.evaluate_mlm(model, one, 4, None, device, "fp32")["mlm_loss"]
    cfg = Teacher(adapt_steps=30, lr=1e-3, batch_size=4, warmup_steps=3, weight_decay=0.01)
    run = Recorder()
    info = teacher.adapt(
        model,
        one,
        cfg,
        Base(precision="fp32"),
        device,
        torch.Generator().manual_seed(0),
        run,
        mask_token_id=tokenizer.mask_token_id,
    )
    after = teacher.evaluate_mlm(model, one, 4, None, device, "fp32")["mlm_loss"]
    assert after < before - 0.5, (before, after)  # ~10.36 -> ~9.6 in 30 steps
    assert info["adapt_steps"] == 30 and info["adapt_seconds"] > 0
    assert [s for s, _ in run.rows] == [10, 20, 30]
    assert set(run.rows[0][1]) == {"adapt.loss", "adapt.lr", "adapt.grad_norm"}
    assert run.rows[-1][1]["adapt.lr"] == pytest.approx(0.0)  # linear decay ends at 0
    assert teacher.decoder_is_tied(model)
    assert model.config._attn_implementation == "eager"  # base.attention auto, on the CPU


def test_adapt_is_seeded(bare_dir, token_dd, tokenizer) -> None:
    cfg = Teacher(adapt_steps=3, lr=1e-3, batch_size=2, warmup_steps=1)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, _ = teacher.load_teacher(str(bare_dir))
        teacher.adapt(
            model,
            token_dd["train"],
            cfg,
            Base(precision="fp32"),
            torch.device("cpu"),
            torch.Generator().manual_seed(7),
            Recorder(),
            mask_token_id=tokenizer.mask_token_id,
        )
        outs.append(model.cls.predictions.transform.dense.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1])


def test_adapt_zero_steps_is_a_no_op(bare_dir, token_dd, tokenizer) -> None:
    model, _ = teacher.load_teacher(str(bare_dir))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    info = teacher.adapt(
        model,
        token_dd["train"],
        Teacher(adapt_steps=0),
        Base(),
        torch.device("cpu"),
        torch.Generator(),
        Recorder(),
        mask_token_id=tokenizer.mask_token_id,
    )
    assert info["adapt_steps"] == 0
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


class LookupLM(nn.Module):
    """A fake MLM (no `cls` head, so the full-logits path): the logits at a position are TABLE[id]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


def test_evaluate_mlm_matches_hand_computation() -> None:
    # Vocabulary of 6; row i of the table ranks the words i, i+1, ..., i+5 (mod 6) best to worst.
    table = torch.tensor([[float(-((j - i) % 6)) for j in range(6)] for i in range(6)])
    ds = Dataset.from_dict(
        {
            "mlm_input_ids": [[0, 1, 2], [3, 4, 5]],
            "attention_mask": [[1, 1, 1], [1, 1, 1]],
            # Targets' ranks under the row of their input id: 0 (hit), 1, skipped; 5 (miss), 0.
            "mlm_labels": [[0, 2, -100], [2, 4, -100]],
        }
    )

    def nll(i: int, t: int) -> float:
        z = [float(-((j - i) % 6)) for j in range(6)]
        return math.log(sum(math.exp(v) for v in z)) - z[t]

    out = teacher.evaluate_mlm(LookupLM(table), ds, 1, None, torch.device("cpu"), "fp32")
    assert out["masked_positions"] == 4
    assert out["top1"] == pytest.approx(2 / 4)  # (0,0) and (4,4)
    assert out["top5"] == pytest.approx(3 / 4)  # all but (3 -> 2), ranked last
    expected = (nll(0, 0) + nll(1, 2) + nll(3, 2) + nll(4, 4)) / 4
    assert out["mlm_loss"] == pytest.approx(expected, rel=1e-6)

    first = teacher.evaluate_mlm(LookupLM(table), ds, 1, 1, torch.device("cpu"), "fp32")
    assert first["masked_positions"] == 2
    assert first["top1"] == pytest.approx(1 / 2) and first["top5"] == pytest.approx(1.0)


def test_saved_teacher_reloads_without_missing_keys(bare_dir, tokenizer, tmp_path) -> None:
    model, _ = teacher.load_teacher(str(bare_dir))
    teacher.save(model, tokenizer, tmp_path)
    again, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert teacher.decoder_is_tied(again)
    assert again.dtype == torch.float32
    ids = torch.tensor([[101, 2000, 103, 102]])
    att = torch.ones_like(ids)
    model.eval(), again.eval()
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=att).logits,
        again(input_ids=ids, attention_mask=att).logits,
    )
    _, has_head = teacher.load_teacher(str(tmp_path))
    assert has_head


def test_stage_writes_teacher_and_metrics(bare_dir, token_dd, tmp_path, monkeypatch) -> None:
    from stages import prepare_teacher

    token_dd.save_to_disk(str(tmp_path / "tokens"))
    params = {
        "base": {"seed": 0, "device": "cpu", "precision": "fp32"},
        "paths": {
            "tokens": str(tmp_path / "tokens"),
            "teacher": str(tmp_path / "teacher"),
            "metrics": str(tmp_path / "metrics"),
        },
        "teacher": {
            "source": str(bare_dir),
            "adapt_steps": 4,
            "batch_size": 2,
            "warmup_steps": 1,
            "eval_batches": 2,
        },
        "loss": {
            "scheme": "logit",
            "arms": ["logit"],
            "schemes": {"logit": {"terms": {"logit": 1.0}}},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepare_teacher.main()

    metrics = json.loads((tmp_path / "metrics" / "teacher.json").read_text())
    assert set(metrics) == {
        "mlm_loss",
        "top1",
        "top5",
        "adapted",
        "adapt_steps",
        "masked_positions",
        "runtime",  # what decided the numbers; the wall time goes to MLflow only
    }
    assert metrics["adapted"] is True and metrics["adapt_steps"] == 4
    assert metrics["runtime"]["attention"] == "eager" and metrics["runtime"]["device"] == "cpu"
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1 and metrics["masked_positions"] > 0
    _, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "teacher", output_loading_info=True)
    assert not info["missing_keys"]
    assert (tmp_path / "teacher" / "tokenizer.json").exists()
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".teacher.tmp")]
