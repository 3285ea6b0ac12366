"""evaluate: hand-checked numbers on toy logits, exact fits, and the stage on tiny random BERTs."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from tiny import tiny_bert
from transformers import BertForMaskedLM

from kd.core.io import read_json
from kd.core.params import Evaluate
from kd.data.masking import IGNORE
from kd.distill.projections import Projections
from kd.evaluation import lstsq
from kd.evaluation.evaluate import Judge, evaluate, fixed_batches, logit_metrics, summarize

VOCAB = 100
SEQ = 12


def tiny(hidden: int, layers: int = 2, seed: int = 0) -> BertForMaskedLM:
    return tiny_bert(hidden, layers, seed, VOCAB, 37, max_position_embeddings=SEQ).eval()


def toy_split(n: int, seed: int) -> Dataset:
    """``n`` blocks like the tokenize stage's: fixed masks, the last block padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    att = torch.ones_like(ids)
    att[-1, 7:] = 0
    ids[:, 0], ids[-1, 7:] = 1, 0
    chosen = (torch.rand(n, SEQ, generator=g) < 0.3) & att.bool()
    chosen[:, 0] = False
    chosen[:, 3] = True  # every block has a masked position
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    masked = torch.where(chosen, torch.full_like(ids, 4), ids)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": att.tolist(),
            "special_tokens_mask": (1 - att).tolist(),
            "mlm_input_ids": masked.tolist(),
            "mlm_labels": labels.tolist(),
        }
    )


@pytest.fixture(scope="module")
def data() -> DatasetDict:
    return DatasetDict(train=toy_split(10, 0), test=toy_split(5, 1))


def test_logit_metrics_hand_checked() -> None:
    # Row 0: true token 2 is the student's argmax. Row 1: not masked. Row 2: true token 4 is the
    # student's third choice (top-5, not top-1).
    p0 = torch.tensor([1, 1, 4, 1, 1, 1]) / 9
    p2 = torch.tensor([0.3, 0.1, 0.1, 0.25, 0.2, 0.05])
    student = torch.stack([p0.log(), torch.tensor([0.0, 3, 0, 0, 0, 0]), p2.log()])
    teacher = torch.stack(
        [torch.tensor([0.0, 0, 5, 0, 0, 0]), torch.tensor([0.0, 0, 0, 0, 0, 3]), p2.log()]
    )
    labels = torch.tensor([2, IGNORE, 4])
    m = logit_metrics(student, teacher, labels, temperature=2.0)
    assert m["n_positions"] == 3 and m["n_masked"] == 2
    assert m["agreement"] == pytest.approx(2 / 3)
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["mlm_loss"] == pytest.approx((-math.log(4 / 9) - math.log(0.2)) / 2, rel=1e-5)
    assert m["teacher_top1"] == 0.5  # teacher row 0 right, row 2 (argmax 0) wrong
    # T² · KL at T=2 differs from KL at T=1; a row identical in both contributes 0 to each.
    assert m["logit_kl_train_t"] > 0 and m["logit_kl_t1"] > 0
    assert m["logit_kl_train_t"] != m["logit_kl_t1"]
    # Without a training temperature there is no extra column; at T = 1 it is the T = 1 KL.
    assert "logit_kl_train_t" not in logit_metrics(student, teacher, labels)
    at_one = logit_metrics(student, teacher, labels, temperature=1.0)
    assert at_one["logit_kl_train_t"] == at_one["logit_kl_t1"]


def test_identical_student_has_zero_kl_full_agreement_and_zero_distance(data) -> None:
    teacher = tiny(32)
    student = copy.deepcopy(teacher)
    proj = Projections(32, 32, [0, 1, 2], shared=False)
    with torch.no_grad():
        for m in proj.maps.values():
            m.weight.copy_(torch.eye(32))
            m.bias.zero_()
    cfg = Evaluate(batch_size=4, train_batches=2, test_batches=None, lstsq_batches=3)
    res = evaluate(
        teacher, student, data["train"], data["test"], cfg, Judge(temperature=2.0), projections=proj
    )
    s = summarize(res.rows)
    for split in ("train", "test"):
        assert s[f"{split}/logit_kl_train_t"] == pytest.approx(0, abs=1e-5)
        assert s[f"{split}/logit_kl_t1"] == pytest.approx(0, abs=1e-5)
        assert s[f"{split}/agreement"] == 1.0
        assert s[f"{split}/mlm_top1"] == s[f"{split}/teacher_mlm_top1"]
    for key in (
        "embedding_lstsq",
        "hidden_lstsq",
        "embedding_learned",
        "hidden_learned",
        "attention_probs",
        "attention_scores",
    ):
        assert s[f"test/{key}"] == pytest.approx(0, abs=1e-6), key
    assert res.layer_map == [1, 2]
    assert res.fit_tokens == 9 * SEQ + 7  # all 10 train blocks, real tokens only


def test_one_row_per_batch_per_split_and_distances_only_held_out(data) -> None:
    cfg = Evaluate(batch_size=4, train_batches=2, test_batches=None, lstsq_batches=3)
    res = evaluate(tiny(32), tiny(16, seed=1), data["train"], data["test"], cfg, Judge())
    frame = pd.DataFrame(res.rows)
    assert list(zip(frame.split, frame.batch, strict=True)) == [
        ("train", 0),
        ("train", 1),
        ("test", 0),
        ("test", 1),
    ]
    # The ragged last test batch (5 = 4 + 1) holds one block with 7 real tokens.
    assert frame.n_tokens.tolist()[-1] == 7
    for col in (
        "logit_kl_train_t",
        "logit_kl_t1",
        "mlm_loss",
        "top1",
        "top5",
        "agreement",
        "hidden_lstsq/layer_1",
        "hidden_lstsq/layer_2",
        "attention_probs",
    ):
        assert frame[frame.split == "test"][col].notna().all(), col
    assert frame[frame.split == "train"]["hidden_lstsq"].isna().all()
    assert "hidden_learned" not in frame  # no learned projections given
    # A least-squares map does at least as well on its own fitting data as the mean predictor;
    # held out, on random models, it is at least finite.
    assert frame["hidden_lstsq"].dropna().map(math.isfinite).all()


def test_test_batches_limit_and_weighted_means(data) -> None:
    assert len(list(fixed_batches(data["test"], 4, None))) == 2
    assert len(list(fixed_batches(data["test"], 4, 1))) == 1
    rows = [
        {
            "split": "test",
            "batch": 0,
            "n_positions": 3,
            "n_masked": 1,
            "n_tokens": 10,
            "logit_kl_t1": 1.0,
            "top1": 0.0,
            "hidden_lstsq": 2.0,
        },
        {
            "split": "test",
            "batch": 1,
            "n_positions": 1,
            "n_masked": 0,
            "n_tokens": 30,
            "logit_kl_t1": 5.0,
            "top1": math.nan,
            "hidden_lstsq": 4.0,
        },
    ]
    s = summarize(rows)
    assert s["test/logit_kl_t1"] == pytest.approx((3 * 1 + 5) / 4)
    assert s["test/mlm_top1"] == 0.0  # the batch without masked positions does not count
    assert s["test/hidden_lstsq"] == pytest.approx((10 * 2 + 30 * 4) / 40)
    assert s["test/batches"] == 2 and s["test/positions"] == 4


def test_lstsq_recovers_an_exact_affine_map() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) * 3 + 5
    w = torch.randn(8, 5, generator=g)
    b = torch.randn(5, generator=g)
    y = x @ w + b
    fit = lstsq.LinearFit()
    for chunk in range(0, 600, 128):
        fit.update(x[chunk : chunk + 128], y[chunk : chunk + 128])
    w_hat, b_hat = fit.solve()
    torch.testing.assert_close(w_hat, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_hat, b, atol=1e-3, rtol=1e-3)
    assert (lstsq.apply(x, w_hat, b_hat) - y).pow(2).mean() < 1e-8


def test_lstsq_exact_on_rank_deficient_inputs() -> None:
    # LayerNorm outputs: features sum to zero per token, so [x 1] is rank-deficient.
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.layer_norm(torch.randn(300, 6, generator=g), (6,))
    y = x @ torch.randn(6, 4, generator=g) + 1.5
    fit = lstsq.LinearFit()
    fit.update(x, y)
    assert (lstsq.apply(x, *fit.solve()) - y).pow(2).mean() < 1e-8


def test_lstsq_rejects_empty_fit() -> None:
    with pytest.raises(ValueError, match="no data"):
        lstsq.LinearFit().solve()


def _params(tmp_path) -> dict:
    paths = {
        k: str(tmp_path / k)
        for k in (
            "corpus",
            "tokens",
            "teacher",
            "student_init",
            "students",
            "checkpoints",
            "metrics",
            "train",
            "eval",
            "report",
            "distilled",
        )
    }
    multi = {"terms": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logit": 1.0}}
    return {
        "base": {"precision": "fp32", "device": "cpu"},
        "paths": paths,
        "loss": {
            "scheme": "multi",
            "arms": ["logit", "multi"],
            "schemes": {"logit": {"terms": {"logit": 1.0}, "temperature": 2.0}, "multi": multi},
        },
        "evaluate": {"batch_size": 4, "train_batches": 2, "test_batches": None, "lstsq_batches": 2},
    }


def test_stage_writes_rows_per_split_and_metrics(tmp_path, data, monkeypatch) -> None:
    from stages import evaluate as stage

    raw = _params(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    data.save_to_disk(raw["paths"]["tokens"])
    tiny(32).save_pretrained(raw["paths"]["teacher"])
    tiny(16, seed=1).save_pretrained(raw["paths"]["student_init"])
    tiny(16, seed=2).save_pretrained(tmp_path / "students" / "logit")
    tiny(16, seed=3).save_pretrained(tmp_path / "students" / "multi")
    torch.save(
        Projections(16, 32, [0, 1, 2], shared=False).state_dict(),
        tmp_path / "students" / "multi" / "projections.pt",
    )
    monkeypatch.chdir(tmp_path)

    for argv in (["--arm", "logit"], ["--arm", "multi"], ["--init"]):
        stage.main(argv)
    out = tmp_path / "eval"
    for name in ("logit", "multi", "student_init"):
        frame = pd.read_csv(out / f"{name}.csv")
        assert frame.groupby("split").size().to_dict() == {"train": 2, "test": 2}
        assert {
            "split",
            "batch",
            "logit_kl_train_t",
            "logit_kl_t1",
            "mlm_loss",
            "top1",
            "top5",
            "agreement",
        } <= set(frame.columns)
        assert len(pd.read_csv(out / f"{name}_train.csv")) == 2
        assert len(pd.read_csv(out / f"{name}_test.csv")) == 2
        m = read_json(out / f"{name}.json")
        assert m["runtime"]["precision"] == "fp32" and m["runtime"]["device"] == "cpu"
        assert m["runtime"]["torch"] == torch.__version__
        for key in (
            "train/logit_kl_train_t",
            "test/logit_kl_t1",
            "test/mlm_top1",
            "test/agreement",
            "test/embedding_lstsq",
            "test/hidden_lstsq",
            "test/attention_probs",
        ):
            assert m[key] is not None, (name, key)
    logit = read_json(out / "logit.json")
    multi = read_json(out / "multi.json")
    assert logit["train_temperature"] == 2.0
    assert logit["test/logit_kl_train_t"] != logit["test/logit_kl_t1"]
    assert "test/hidden_learned" in multi and "test/hidden_learned" not in logit
    assert multi["layer_map"] == [1, 2]


def test_every_scheme_is_scored_on_the_masked_positions_at_its_final_temperature(data) -> None:
    """Schemes rank on one measure: a scheme that trained on every position and a scheduled
    temperature is still scored at the fixed masked positions, T = 1 for the comparison and its
    schedule's end (not its start) for the extra column."""
    from kd.core.params import Scheme

    scheme = Scheme(terms={"logit": 1.0}, logit_positions="all", temperature=4.0,
                    temperature_schedule={"kind": "linear", "end": 2.0})
    judge = Judge.of(scheme)
    assert judge.temperature == 2.0
    cfg = Evaluate(batch_size=4, train_batches=2, test_batches=None, lstsq_batches=2)
    rows = evaluate(tiny(32), tiny(16, seed=1), data["train"], data["test"], cfg, judge).rows
    masked = [
        int((torch.as_tensor(data[split]["mlm_labels"][b * 4:(b + 1) * 4]) != IGNORE).sum())
        for split in ("train", "test")
        for b in range(2)
    ]
    assert [r["n_positions"] for r in rows] == masked
    assert all(r["n_positions"] == r["n_masked"] for r in rows)
