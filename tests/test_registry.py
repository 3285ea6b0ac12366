"""The registry's identity is the exported weights: a new version exactly when they change,
whatever the git revision and params (kd/report/registry.py). Tiny causal and MLM students,
registered through a real tracking run into the test's SQLite database."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_bert, tiny_llama, word_tokenizer

from kd.core import tracking
from kd.report import registry

WORDS = "the history of roman empire spans several centuries".split()
HEAD = {"scheme": "multi", "perplexity": 40.0, "kl_t1": 1.0}


def _export(folder, seed: int, edit: float = 0.0):
    model = tiny_llama(layers=2, vocab=len(WORDS) + 2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += edit  # tied to the embeddings: one number changes
    model.save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return folder


def _register(folder, monkeypatch, group: str, head=HEAD, entry=registry.CAUSAL) -> str:
    # The old identity (group, i.e. revision + params) is held fixed or varied on purpose.
    monkeypatch.setenv("DVC_EXP_NAME", group)
    with tracking.start_run("causal_report") as run:
        return registry.register(run, folder, head, entry)


@pytest.mark.slow  # MLflow logs a transformers pipeline per version
def test_same_weights_one_version_new_weights_a_new_one_that_newest_loads(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land beside its database
    folder = _export(tmp_path / "distilled", seed=0)
    first = _register(folder, monkeypatch, "brisk-otter")
    # The report rerun alone, and another execution that exports the same weights: no version.
    assert _register(folder, monkeypatch, "brisk-otter") == first
    assert _register(folder, monkeypatch, "calm-heron", {**HEAD, "kl_t1": 0.5}) == first
    client = mlflow.MlflowClient()
    [v1] = client.search_model_versions(f"name = '{registry.CAUSAL.name}'")
    # Tagged by the latest execution that exported these weights.
    assert v1.tags["kd.group"] == "calm-heron" and v1.tags["metric.kl_t1"] == "0.5000"
    assert v1.tags[registry.DIGEST_TAG] == registry.weights_digest(folder)

    # A code edit under the same revision and params (the old identity) that moves one weight.
    _export(folder, seed=0, edit=1.0)
    second = _register(folder, monkeypatch, "calm-heron")
    assert second != first
    name = registry.CAUSAL.name
    assert str(client.get_model_version_by_alias(name, registry.ALIAS).version) == second
    loaded = mlflow.transformers.load_model(f"models:/{name}@{registry.ALIAS}")
    got = loaded.model.lm_head.weight[0, 0].item()
    want = tiny_llama(layers=2, vocab=len(WORDS) + 2, seed=0).lm_head.weight[0, 0].item() + 1.0
    assert got == pytest.approx(want)

    # Back to the first weights: no third version, and newest follows them.
    _export(folder, seed=0)
    assert _register(folder, monkeypatch, "calm-heron") == first
    assert str(client.get_model_version_by_alias(name, registry.ALIAS).version) == first
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


@pytest.mark.slow
def test_both_families_register_under_their_own_names(tmp_path, monkeypatch, default_tokenizer):
    import mlflow

    monkeypatch.chdir(tmp_path)
    mlm = tmp_path / "mlm"
    tiny_bert(16, 1, seed=0, vocab=default_tokenizer.vocab_size).save_pretrained(mlm)
    default_tokenizer.save_pretrained(mlm)
    head = {"scheme": "logit", "test/logit_kl_t1": 2.0}
    assert _register(mlm, monkeypatch, "g", head, registry.MLM) == "1"
    assert _register(_export(tmp_path / "causal", seed=1), monkeypatch, "g") == "1"
    client = mlflow.MlflowClient()
    for entry in (registry.MLM, registry.CAUSAL):
        assert str(client.get_model_version_by_alias(entry.name, registry.ALIAS).version) == "1"


def test_weights_digest_reads_the_weights_only(tmp_path) -> None:
    folder = _export(tmp_path / "a", seed=0)
    digest = registry.weights_digest(folder)
    (folder / "README.md").write_text("a new model card")
    assert registry.weights_digest(folder) == digest
    _export(folder, seed=1)
    assert registry.weights_digest(folder) != digest
    with pytest.raises(FileNotFoundError, match="no weight files"):
        registry.weights_digest(tmp_path)
