from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from kd.distill.hooks import attention_probs, attention_scores, capture


def _model(attn_implementation: str = "sdpa") -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        # transformers 5: set on the config; the model constructor rejects the kwarg.
        attn_implementation=attn_implementation,
    )
    return BertForMaskedLM(config).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def _no_hooks(model: torch.nn.Module) -> bool:
    # transformers 5 installs its own persistent output-capturing hooks on encoder layers at
    # the first forward, so "no hooks" means none of ours is left.
    return all(
        hook.__module__ != "kd.distill.hooks" for m in model.modules() for hook in m._forward_hooks.values()
    )


def test_capture_matches_hidden_states() -> None:
    model = _model()
    ids, mask = _batch()
    paths = {"emb": "bert.embeddings", "l0": "bert.encoder.layer.0", "l1": "bert.encoder.layer.1"}
    with torch.no_grad(), capture(model, paths) as out:
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert set(out) == set(paths)
    for i, name in enumerate(["emb", "l0", "l1"]):
        torch.testing.assert_close(out[name], ref.hidden_states[i])
    assert _no_hooks(model)
    assert not model.bert.embeddings._forward_hooks


def test_hooks_removed_after_exception() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), capture(model, {"e": "bert.embeddings"}):
        assert model.bert.embeddings._forward_hooks
        raise RuntimeError("boom")
    assert not model.bert.embeddings._forward_hooks
    assert _no_hooks(model)


def test_bad_path_raises_with_suggestions() -> None:
    model = _model()
    with (
        pytest.raises(ValueError) as err,
        capture(model, {"ok": "bert.embeddings", "x": "bert.encoder.layers.0"}),
    ):
        pass
    assert "bert.encoder.layers.0" in str(err.value)
    assert "bert.encoder.layer.0" in str(err.value)
    assert _no_hooks(model)


def test_attention_scores_match_eager_attentions() -> None:
    model = _model("eager")
    ids, mask = _batch()
    heads = model.config.num_attention_heads
    paths = {}
    for i in range(model.config.num_hidden_layers):
        paths[f"q{i}"] = f"bert.encoder.layer.{i}.attention.self.query"
        paths[f"k{i}"] = f"bert.encoder.layer.{i}.attention.self.key"
    with torch.no_grad(), capture(model, paths) as out:
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(ref.attentions) == model.config.num_hidden_layers
    real = mask.bool()
    pair = (real[:, None, :, None] & real[:, None, None, :]).expand_as(ref.attentions[0])
    for i, expected in enumerate(ref.attentions):
        scores = attention_scores(out[f"q{i}"], out[f"k{i}"], heads, mask)
        assert scores.shape == expected.shape
        assert torch.isfinite(scores).all()
        probs = attention_probs(scores)
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs[pair], expected[pair], rtol=1e-5, atol=1e-6)
        assert not model.get_submodule(paths[f"q{i}"])._forward_hooks
        # Padded keys get (numerically) zero weight, as in the model.
        assert probs[0, :, :, 4:].abs().max() < 1e-6


def test_attention_scores_bad_heads() -> None:
    q = torch.zeros(1, 3, 16)
    with pytest.raises(ValueError, match="divisible"):
        attention_scores(q, q, 3, None)


def test_attention_scores_without_mask_is_plain_qk() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    scores = attention_scores(q, k, 2, None)
    qh = q.view(2, 4, 2, 3).transpose(1, 2)
    kh = k.view(2, 4, 2, 3).transpose(1, 2)
    torch.testing.assert_close(scores, qh @ kh.transpose(-1, -2) / 3**0.5)
