"""The registry on the tiny pipeline: after a one-line code edit (uncommitted: the same git
revision and params) and `dvc repro`, `models:/kd-student@newest` loads the new weights; the
report rerun alone on the same weights adds no version."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from kd.report import registry

pytestmark = [pytest.mark.slow, pytest.mark.long]

EDIT = ("kd/core/optim.py", "lr=lr, fused=fused", "lr=lr * 2, fused=fused")


def _versions(client) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{registry.NAME}'"))


def test_a_code_edit_that_changes_the_weights_is_what_newest_loads(tiny_pipeline, tmp_path,
                                                                   monkeypatch) -> None:  # fmt: skip
    import mlflow

    repo = tiny_pipeline.clone(tiny_pipeline.repo.path, tmp_path / "repo")
    uri = f"sqlite:///{repo.path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    [first] = _versions(client)
    distilled = repo.path / "data" / "distilled"
    assert client.get_model_version(registry.NAME, first).tags[registry.DIGEST_TAG] == (
        registry.weights_digest(distilled)
    )

    repo.run("dvc", "repro", "-f", "-s", "report")
    assert _versions(client) == [first]

    path, old, new = EDIT
    source = (repo.path / path).read_text()
    assert source.count(old) == 1, f"{path} changed: pick another one-line edit"
    (repo.path / path).write_text(source.replace(old, new))
    out = repo.run("dvc", "repro", timeout=1500)
    assert "Running stage 'train@multi'" in out
    versions = _versions(client)
    assert len(versions) == 2
    newest = str(client.get_model_version_by_alias(registry.NAME, registry.ALIAS).version)
    assert newest != first
    assert client.get_model_version(registry.NAME, newest).tags[registry.DIGEST_TAG] == (
        registry.weights_digest(distilled)
    )

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(repo.path)  # the artifacts' relative location
    loaded = mlflow.transformers.load_model(f"models:/{registry.NAME}@{registry.ALIAS}").model
    want = load_file(distilled / "model.safetensors")
    got = loaded.state_dict()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
