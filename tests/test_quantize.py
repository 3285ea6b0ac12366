"""Distil, then quantize: on tiny random BERTs, the int8 copy stays close, shrinks, and the stage
writes what dvc.yaml declares."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from mlflow.tracking import MlflowClient
from tiny import tiny_bert, topic_folder
from torch import nn
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from kd.core.io import read_json
from kd.core.params import Quantize
from kd.core.tracking import EXPERIMENT, STAGE_RUNS
from kd.data.masking import IGNORE
from kd.quantize import dynamic as quantize

VOCAB, SEQ = 100, 16
SMALL = dict(
    batch_size=4,
    test_batches=2,
    latency_batch_sizes=[1, 3],
    latency_seq_length=12,
    warmup_batches=1,
    latency_batches=2,
)


def tiny(hidden: int = 64, layers: int = 2, seed: int = 0) -> BertForMaskedLM:
    return tiny_bert(hidden, layers, seed, VOCAB, 4 * hidden, max_position_embeddings=SEQ).eval()


def toy_split(n: int = 10, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    att = torch.ones_like(ids)
    att[-1, 9:] = 0
    ids[-1, 9:] = 0
    chosen = (torch.rand(n, SEQ, generator=g) < 0.3) & att.bool()
    chosen[:, 3] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": att.tolist(),
            "special_tokens_mask": (1 - att).tolist(),
            "mlm_input_ids": torch.where(chosen, torch.full_like(ids, 4), ids).tolist(),
            "mlm_labels": labels.tolist(),
        }
    )


def test_quantized_logits_stay_close_to_fp32() -> None:
    model = tiny()
    q = quantize.quantize_dynamic(model)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize.quantized_linears(q) == n_linear == 2 * 6 + 2
    assert quantize.quantized_linears(model) == 0  # the fp32 student is left untouched
    ids = torch.randint(5, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        f, z = model(ids).logits, q(ids).logits
    assert not torch.equal(f, z)
    assert (f - z).abs().max() < 0.05 * f.abs().max()
    assert (f.argmax(-1) == z.argmax(-1)).float().mean() > 0.9


def test_size_shrinks_and_the_state_dict_reloads(tmp_path) -> None:
    model = tiny()
    q = quantize.quantize_dynamic(model)
    fp32, int8 = quantize.state_dict_bytes(model), quantize.save_state_dict(q, tmp_path / "q.pt")
    # Linear weights dominate this model: int8 is about a quarter of their fp32 size.
    assert int8 < 0.5 * fp32
    assert (tmp_path / "q.pt").stat().st_size == int8
    # The documented way back: quantize a fresh model of the same config, load the state.
    again = quantize.quantize_dynamic(BertForMaskedLM(model.config))
    again.load_state_dict(torch.load(tmp_path / "q.pt"))
    ids = torch.randint(5, VOCAB, (2, SEQ))
    with torch.inference_mode():
        torch.testing.assert_close(again(ids).logits, q(ids).logits, rtol=0, atol=0)


def test_latency_inputs_cut_and_cycle_real_blocks() -> None:
    test = toy_split(3)
    got = quantize.latency_inputs(test, 5, 12)
    assert got["input_ids"].shape == got["attention_mask"].shape == (5, 12)
    assert torch.equal(got["input_ids"][3], got["input_ids"][0])
    with pytest.raises(SystemExit, match="latency_seq_length=32"):
        quantize.latency_inputs(test, 1, 32)


def test_run_scores_sizes_and_times_both_models(tmp_path) -> None:
    cfg = Quantize(**SMALL)
    result = quantize.run(tiny(32, seed=1), tiny(seed=2), toy_split(), cfg, tmp_path)
    m, lat = result.metrics, result.latency
    assert m["dtype"] == "qint8" and m["test_batches"] == 2 and m["positions"] > 0
    for name in ("fp32", "int8"):
        for key in ("logit_kl_t1", "agreement", "mlm_loss", "mlm_top1", "mlm_top5"):
            assert math.isfinite(m[f"{name}/{key}"]), (name, key)
        assert lat[f"{name}/latency_ms/b3"] > 0 and math.isfinite(lat[f"{name}/latency_ms/b1"])
    # Wall time never lands in the metrics, which DVC hashes.
    assert not [k for k in m if "latency" in k or "speedup" in k]
    assert m["int8/size_bytes"] < m["fp32/size_bytes"] and 0 < m["size_ratio"] < 1
    assert (tmp_path / "student_qint8.pt").stat().st_size == m["int8/size_bytes"]
    assert lat["int8/latency_ms_per_seq/b3"] == pytest.approx(lat["int8/latency_ms/b3"] / 3)
    assert lat["speedup/b3"] == pytest.approx(lat["fp32/latency_ms/b3"] / lat["int8/latency_ms/b3"])
    assert 0 <= m["int8/kl_to_fp32"] < 0.01 and m["int8/agreement_with_fp32"] > 0.9
    # The quantized student is judged against the teacher like the fp32 one.
    assert m["int8/logit_kl_t1"] == pytest.approx(m["fp32/logit_kl_t1"], rel=0.1)
    report = quantize.markdown(m, cfg)
    assert "| MLM top-1 |" in report and "per sequence" not in report and "×" not in report
    assert "| 3 |" in quantize.latency_markdown(lat, cfg, threads=1)


def test_quantize_params_validate() -> None:
    with pytest.raises(ValueError):
        Quantize(dtype="float16")
    with pytest.raises(ValueError):
        Quantize(latency_batch_sizes=[])


def _stage_params(tmp_path, probe: dict | None = None) -> dict:
    paths = {
        k: str(tmp_path / k) for k in ("tokens", "teacher", "distilled", "metrics", "quantize")
    }
    raw = {
        "base": {"device": "cpu", "threads": 1},
        "paths": paths,
        "loss": {
            "scheme": "logit",
            "arms": ["logit"],
            "schemes": {"logit": {"terms": {"logit": 1.0}}},
        },
        "quantize": {**SMALL, "probe": probe is not None},
    }
    if probe is not None:
        raw["probe"] = probe
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return paths


def test_stage_writes_metrics_report_and_model(tmp_path, monkeypatch) -> None:
    from stages import quantize as stage

    paths = _stage_params(tmp_path)
    DatasetDict({"train": toy_split(4, seed=1), "test": toy_split()}).save_to_disk(paths["tokens"])
    tiny(32, seed=1).save_pretrained(paths["teacher"])
    student = tiny(seed=2)
    student.save_pretrained(paths["distilled"])
    monkeypatch.chdir(tmp_path)
    stage.main()

    m = read_json(tmp_path / "metrics" / "quantize.json")
    assert all(v is not None for v in m.values())
    assert m["int8/size_bytes"] < m["fp32/size_bytes"]
    out = tmp_path / "quantize"
    assert sorted(p.name for p in out.iterdir()) == ["quantize.md", "student_qint8.pt"]
    assert "Distil, then quantize" in (out / "quantize.md").read_text()
    # The saved int8 weights rebuild the model the stage measured.
    q = quantize.quantize_dynamic(AutoModelForMaskedLM.from_pretrained(paths["distilled"]))
    q.load_state_dict(torch.load(out / "student_qint8.pt"))
    assert (out / "student_qint8.pt").stat().st_size == m["int8/size_bytes"]

    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], STAGE_RUNS)
    assert run.data.tags["kd.stage"] == "quantize"
    assert run.data.metrics["size_ratio"] == pytest.approx(m["size_ratio"])


def test_stage_probes_fp32_and_int8_on_the_probe_stage_split(
    tmp_path, monkeypatch, default_tokenizer
) -> None:
    """With quantize.probe on, both models get kd.probe.probe's linear probe on the same texts, and
    the number for fp32 is exactly what kd.probe.probe computes for the exported student on the CPU."""
    from kd.core.params import Probe
    from kd.probe import probe
    from stages import quantize as stage

    vocab = default_tokenizer.vocab_size  # real words: the toy topics must tokenize
    cfg = {
        "source": "folder",
        "folder": str(topic_folder(tmp_path / "topics", per_class=12)),
        "test_fraction": 0.25,
        "max_seq_length": 32,
        "batch_size": 8,
    }
    paths = _stage_params(tmp_path, cfg)
    DatasetDict({"train": toy_split(4, seed=1), "test": toy_split()}).save_to_disk(paths["tokens"])
    tiny_bert(32, 2, 1, vocab, max_position_embeddings=SEQ).save_pretrained(paths["teacher"])
    tiny_bert(24, 2, 2, vocab, max_position_embeddings=SEQ).save_pretrained(paths["distilled"])
    default_tokenizer.save_pretrained(paths["distilled"])
    monkeypatch.chdir(tmp_path)
    stage.main()

    m = read_json(tmp_path / "metrics" / "quantize.json")
    assert 0.0 <= m["int8/probe_linear_acc"] <= 1.0
    assert "| linear probe accuracy" in (tmp_path / "quantize" / "quantize.md").read_text()
    # The fp32 number is kd.probe.probe's own linear probe of the exported student (CPU, fp32).
    data = probe.load(Probe(**cfg))
    train, test = probe.split(data.labels, 0.25, 0)
    model, tok = probe.load_encoder(tmp_path / "distilled")
    x = probe.features(model, probe.tokenize(tok, data.texts, 32), tok.pad_token_id, 8,
                       torch.device("cpu"))
    y = data.labels
    expected = probe.linear_probe(x[train], y[train], x[test], y[test], 1.0, 1000)
    assert m["fp32/probe_linear_acc"] == pytest.approx(expected)
    # int8 weights move each feature by ~1 %: at most one of the 9 held-out texts may flip.
    assert abs(m["int8/probe_linear_acc"] - m["fp32/probe_linear_acc"]) <= 1 / 9 + 1e-9
