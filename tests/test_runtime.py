"""base.attention: which attention kernel trains a model, and that switching it changes only the
kernel — the same loss and gradients, up to float summation order."""

from __future__ import annotations

import pytest
import torch
from tiny import mlm_loss_and_grads, tiny_bert

from kd.core.params import Base, ParamsError, Scheme, Train, parse_params
from kd.core.runtime import attention_implementation, use_training_attention
from kd.distill.distiller import Distiller
from kd.training.loop import Stepper

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
VOCAB = 50


def test_auto_is_eager_on_cpu_and_sdpa_on_gpu_and_a_choice_is_kept() -> None:
    assert attention_implementation("auto", CPU) == "eager"
    assert attention_implementation("auto", CUDA) == "sdpa"
    for choice in ("sdpa", "eager"):
        assert attention_implementation(choice, CPU) == choice
        assert attention_implementation(choice, CUDA) == choice


def test_an_unknown_kernel_is_a_params_error_naming_the_key() -> None:
    with pytest.raises(ParamsError, match="base.attention"):
        parse_params({"base": {"attention": "flash"}, "loss": {"scheme": "logit", "arms": ["logit"],
                      "schemes": {"logit": {"terms": {"logit": 1.0}}}}})
    assert Base().attention == "auto"


def test_switching_the_kernel_keeps_the_loss_and_gradients() -> None:
    model = tiny_bert(32, 2, 0, VOCAB, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding must be masked the same way by both kernels
    use_training_attention(model, "sdpa", CPU)
    assert model.config._attn_implementation == "sdpa"
    loss_sdpa, grads_sdpa = mlm_loss_and_grads(model, ids, mask)
    use_training_attention(model, "auto", CPU)
    assert model.config._attn_implementation == "eager"
    loss_eager, grads_eager = mlm_loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss_eager, loss_sdpa, rtol=1e-5, atol=1e-6)
    assert grads_eager.keys() == grads_sdpa.keys()
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grad, grads_sdpa[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_stepper_trains_the_student_on_the_chosen_kernel_and_leaves_the_teacher() -> None:
    scheme = Scheme(terms={"hidden": 1.0, "attention": 1.0, "logit": 1.0})
    # On the CPU, eager attention trains with kd/training/dropout.py's masks: the same math, "kd_eager".
    for choice, expected in (("auto", "kd_eager"), ("eager", "kd_eager"), ("sdpa", "sdpa")):
        teacher, student = tiny_bert(24, 2, 1, VOCAB), tiny_bert(16, 2, 2, VOCAB)
        Stepper(Distiller(student, teacher, scheme), teacher, Train(batch_size=2), 4, "fp32",
                CPU, attention=choice)
        assert student.config._attn_implementation == expected
        assert teacher.config._attn_implementation == "sdpa"  # forward only: left as loaded


def test_train_dropout_sets_every_dropout_of_the_student_only_and_not_its_config() -> None:
    from kd.training.loop import set_dropout

    scheme = Scheme(terms={"logit": 1.0})
    teacher, student = tiny_bert(24, 2, 1, VOCAB), tiny_bert(16, 2, 2, VOCAB)
    Stepper(Distiller(student, teacher, scheme), teacher, Train(batch_size=2, dropout=0.0), 4,
            "fp32", CPU)
    ids = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    student.train()
    with torch.no_grad():
        a, b = student(input_ids=ids).logits, student(input_ids=ids).logits
        student.eval()
        c = student(input_ids=ids).logits
    assert torch.equal(a, b) and torch.equal(a, c)  # no dropout left in training mode
    assert student.config.hidden_dropout_prob == 0.1  # what save_pretrained writes is untouched
    assert any(m.p == 0.1 for m in teacher.modules() if isinstance(m, torch.nn.Dropout))
    assert set_dropout(student, 0.2) == 2 * 3 + 1  # per layer: attention, 2 outputs; embeddings
    student.train()
    with torch.no_grad():
        assert not torch.equal(student(input_ids=ids).logits, student(input_ids=ids).logits)
    with pytest.raises(ValueError):
        Train(dropout=1.0)


def test_freed_memory_stays_in_the_process() -> None:
    # mallopt is process-wide: measure in fresh interpreters. glibc's own accounting (mallinfo2)
    # says where a 16 MiB tensor came from and what freeing it gave back, so this counts bytes,
    # not page faults (which depend on what else the machine does; the speed-up itself is
    # measured by the benchmark). By default the block is mmapped and unmapped on free; with
    # memory kept it comes from the heap, and the heap keeps it once freed.
    import subprocess
    import sys

    code = (
        "import ctypes, sys, torch\n"
        "from kd.core.runtime import keep_freed_memory\n"
        "fields = ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',\n"
        "          'uordblks', 'fordblks', 'keepcost')\n"
        "class Info(ctypes.Structure): _fields_ = [(f, ctypes.c_size_t) for f in fields]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "if not hasattr(libc, 'mallinfo2'): print('none'); sys.exit()\n"
        "libc.mallinfo2.restype = Info\n"
        "kept = keep_freed_memory() if sys.argv[1] == '1' else None\n"
        "b = libc.mallinfo2(); x = torch.ones(4 << 20); d = libc.mallinfo2(); del x\n"
        "a = libc.mallinfo2()\n"
        "print(kept, d.hblkhd - b.hblkhd, a.fordblks - b.fordblks)\n"
    )
    got = {}
    for keep in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, keep], capture_output=True, text=True,
                             check=True).stdout.split()
        if out == ["none"] or (keep == "1" and out[0] != "True"):
            pytest.skip("not glibc 2.33+: mallopt/mallinfo2 are unavailable, nothing is changed")
        got[keep] = (int(out[1]), int(out[2]))
    block = 16 << 20
    mmapped, freed_kept = got["0"]
    assert mmapped >= block, got  # the default: its own mapping, returned to the kernel on free
    mmapped, freed_kept = got["1"]
    assert mmapped == 0 and freed_kept >= block, got  # kept: from the heap, and kept there
