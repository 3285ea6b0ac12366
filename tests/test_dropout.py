"""kd/training/dropout.py: cheaper CPU dropout masks with dropout's distribution, and a model that trains
on them computes what it did on torch's dropout whenever no element is dropped."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from tiny import mlm_loss_and_grads, tiny_bert

from kd.core.params import Scheme, Train
from kd.distill.distiller import Distiller
from kd.training.dropout import (
    IMPLEMENTATION,
    Dropout,
    drop,
    drop_rate,
    keep_mask,
    use_fast_dropout,
)
from kd.training.loop import Stepper

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
VOCAB = 50


def test_the_rate_is_p_to_within_half_a_quantum() -> None:
    for p in (0.0, 0.05, 0.1, 0.3, 0.5, 0.9):
        assert abs(drop_rate(p) - p) <= 2**-16
    assert drop_rate(0.1) == 3277 / 32768


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_both_lanes_drop_at_the_rate_independently_of_position(p: float) -> None:
    torch.manual_seed(0)
    n = 2_000_000
    keep = keep_mask((n,), p, CPU)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    rate = drop_rate(p)
    sigma = math.sqrt(rate * (1 - rate) / (n // 2))
    for lane in (0, 1):  # the two 16-bit halves of each draw use different thresholds
        dropped = 1 - keep.view(-1, 2)[:, lane].float().mean().item()
        assert abs(dropped - rate) < 5 * sigma, (lane, dropped, rate)
    # Neighbours are independent: P(both dropped) = rate², not rate.
    pair = (~keep.view(-1, 2)).all(dim=1).float().mean().item()
    assert abs(pair - rate**2) < 5 * math.sqrt(rate**2 / (n // 2))


def test_odd_sizes_and_shapes() -> None:
    keep = keep_mask((3, 5, 7), 0.1, CPU)
    assert keep.shape == (3, 5, 7)
    assert keep_mask((1,), 0.1, CPU).shape == (1,)


def test_drop_keeps_or_scales_each_element_and_its_gradient_the_same_way() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(2)
    y = drop(x, 0.1)
    torch.manual_seed(2)
    keep = keep_mask(x.shape, 0.1, CPU)  # the same draw
    scale = 1 / (1 - drop_rate(0.1))
    torch.testing.assert_close(y, x.detach() * keep * scale, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep * scale, rtol=0, atol=0)
    assert 0 < (~keep).sum() < keep.numel()


def test_the_output_is_unbiased_and_seeded() -> None:
    x = torch.ones(1_000_000)
    torch.manual_seed(3)
    a = drop(x, 0.1)
    assert abs(a.mean().item() - 1.0) < 5 * math.sqrt(0.1 / 0.9 / x.numel())
    torch.manual_seed(3)
    assert torch.equal(drop(x, 0.1), a)


def test_identity_when_not_training_or_p_is_zero_and_zero_at_p_one() -> None:
    x = torch.randn(4, 8)
    assert drop(x, 0.1, training=False) is x
    assert drop(x, 0.0) is x
    assert torch.equal(drop(x, 1.0), torch.zeros_like(x))
    bf16 = torch.randn(4, 8, dtype=torch.bfloat16)
    assert drop(bf16, 0.3).dtype == torch.bfloat16


def test_a_model_on_the_new_masks_computes_the_same_when_nothing_is_dropped() -> None:
    # Training mode with p = 0 runs every dropout call site: the loss and gradients must be
    # exactly transformers' eager ones, padding included.
    model = tiny_bert(32, 2, 0, VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      attn_implementation="eager")
    ids = torch.randint(5, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    model.train()
    loss_ref, grads_ref = mlm_loss_and_grads(model, ids, mask)
    assert use_fast_dropout(model, CPU)
    assert model.config._attn_implementation == IMPLEMENTATION
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    loss, grads = mlm_loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_attention_probabilities_are_dropped_at_the_rate() -> None:
    model = tiny_bert(32, 1, 0, VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.25,
                      attn_implementation="eager")
    use_fast_dropout(model, CPU)
    ids = torch.randint(5, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        probs = model(input_ids=ids, output_attentions=True).attentions[0]
    dropped = (probs == 0).float().mean().item()  # softmax never gives an exact 0 here
    assert abs(dropped - drop_rate(0.25)) < 0.01
    model.eval()
    with torch.no_grad():
        probs = model(input_ids=ids, output_attentions=True).attentions[0]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_the_stepper_uses_the_masks_on_the_cpu_only_and_keeps_p() -> None:
    scheme = Scheme(terms={"logit": 1.0})
    teacher, student = tiny_bert(24, 2, 1, VOCAB), tiny_bert(16, 2, 2, VOCAB)
    Stepper(Distiller(student, teacher, scheme), teacher, Train(batch_size=2, dropout=0.2), 4,
            "fp32", CPU)
    ours = [m for m in student.modules() if isinstance(m, torch.nn.Dropout)]
    assert ours and all(type(m) is Dropout and m.p == 0.2 for m in ours)
    assert all(type(m) is torch.nn.Dropout for m in teacher.modules()
               if isinstance(m, torch.nn.Dropout))
    gpu_student = tiny_bert(16, 2, 2, VOCAB)
    assert not use_fast_dropout(gpu_student, CUDA)  # decided by the device; nothing moves
    assert gpu_student.config._attn_implementation != IMPLEMENTATION


def test_a_saved_student_loads_without_this_module(tmp_path) -> None:
    model = tiny_bert(16, 1, 0, VOCAB, attn_implementation="eager")
    use_fast_dropout(model, CPU)
    model.save_pretrained(tmp_path)
    code = ("import sys; from transformers import AutoModelForMaskedLM as M; "
            f"m = M.from_pretrained({str(tmp_path)!r}); "
            "assert 'kd' not in sys.modules; print(m.config._attn_implementation)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("eager", "sdpa")
