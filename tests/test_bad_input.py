"""Bad models and half-finished outputs: a clear error, and nothing previous is lost."""

from __future__ import annotations

import pytest
from transformers import BertConfig, BertForMaskedLM

from kd.core.io import atomic_dir, atomic_file
from kd.core.params import Student
from kd.data import assets
from kd.models import student


def test_missing_teacher_path_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="does not exist: give an existing local directory"):
        assets.resolve_model(str(tmp_path / "no-such-teacher"))


def test_student_checkpoint_with_another_vocabulary_is_refused(tmp_path):
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "other-vocab")
    with pytest.raises(SystemExit, match="vocabulary of 99 word pieces but the teacher's has 120"):
        student.build(Student(checkpoint=str(tmp_path / "other-vocab")), 120, 128, seed=0)


def test_student_from_config_is_seeded_and_shaped():
    cfg = Student(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    a = student.build(cfg, 50, 128, seed=1)
    b = student.build(cfg, 50, 128, seed=1)
    c = student.build(cfg, 50, 128, seed=2)
    assert student.weights_hash(a) == student.weights_hash(b) != student.weights_hash(c)
    assert a.config.vocab_size == 50 and a.config.num_hidden_layers == 2


def test_saved_student_reloads_with_the_same_hash(tmp_path):
    m = student.build(
        Student(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
        50,
        128,
        seed=1,
    )
    m.save_pretrained(tmp_path)
    again = BertForMaskedLM.from_pretrained(tmp_path)
    assert student.weights_hash(again) == student.weights_hash(m)


def test_failed_write_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "weights").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(out) as d:
        (d / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp litter either

    f = tmp_path / "m.json"
    with atomic_file(f) as fh:
        fh.write("{}")
    with pytest.raises(RuntimeError), atomic_file(f) as fh:
        fh.write('{"half')
        raise RuntimeError
    assert f.read_text() == "{}"


# --- A weights file cut short (kd/data/weights.py): refused from its header and size ------------


def _tiny_mlm(path, safe: bool = True, shard: str | None = None):
    cfg = BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)  # fmt: skip
    kwargs = {"max_shard_size": shard} if shard else {}
    model = BertForMaskedLM(cfg)
    model.save_pretrained(path, **kwargs)
    if not safe:  # transformers 5 saves only safetensors: torch.save's zip format by hand
        import torch

        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def _cut(path, keep: int = -100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_whole_weights_pass_and_a_folder_without_weights_is_not_this_checks_business(tmp_path):
    from kd.data import weights

    assert weights.problem(_tiny_mlm(tmp_path / "safe")) is None
    assert weights.problem(_tiny_mlm(tmp_path / "bin", safe=False)) is None
    assert weights.problem(_tiny_mlm(tmp_path / "sharded", shard="20KB")) is None
    (tmp_path / "empty").mkdir()
    assert weights.problem(tmp_path / "empty") is None  # models.require_weights says that
    assert weights.problem("bert-base-uncased") is None  # a hub name: checked when fetched


@pytest.mark.parametrize(
    ("cut", "says"),
    [
        (-100, "is 41"),  # the data cut short: "is N bytes, but its header declares M"
        (20, "but its header alone declares"),  # the header itself cut
        (5, "shorter than the 8-byte length"),
    ],
)
def test_a_cut_safetensors_file_is_named_with_the_fix(tmp_path, cut, says):
    from kd.data import weights

    folder = _tiny_mlm(tmp_path / "m")
    _cut(folder / "model.safetensors", cut)
    path, what = weights.problem(folder)
    assert path == folder / "model.safetensors"
    with pytest.raises(SystemExit) as err:
        weights.require_intact(folder, "teacher.source")
    msg = str(err.value)
    assert msg.startswith(f"teacher.source: the weights file {path} ")
    assert "copy or download the model again" in msg and "\n" not in msg
    if cut == -100:
        assert "but its header declares" in what


def test_a_cut_or_missing_shard_and_a_cut_torch_file_are_found(tmp_path):
    from kd.data import weights

    sharded = _tiny_mlm(tmp_path / "sharded", shard="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    _cut(shards[-1])
    assert weights.problem(sharded)[0] == shards[-1]
    shards[-1].unlink()
    assert weights.problem(sharded) == (shards[-1], "is missing (the shard index names it)")

    legacy = _tiny_mlm(tmp_path / "bin", safe=False)
    _cut(legacy / "pytorch_model.bin")
    path, what = weights.problem(legacy)
    assert path.name == "pytorch_model.bin" and "not a whole zip archive" in what


def test_every_loader_of_a_user_model_folder_refuses_a_cut_file(tmp_path):
    """The MLM teacher, a student checkpoint and a causal teacher folder: one paragraph naming
    the file, where transformers would raise safetensors' "incomplete metadata" error."""
    from tiny import tiny_llama

    from kd.causal import teacher as causal_teacher
    from kd.models import teacher

    folder = _tiny_mlm(tmp_path / "m")
    _cut(folder / "model.safetensors")
    with pytest.raises(SystemExit, match="teacher.source: the weights file .*model.safetensors"):
        teacher.load_teacher(str(folder))
    with pytest.raises(SystemExit, match="student.checkpoint: the weights file"):
        student.build(Student(checkpoint=str(folder)), 99, 128, seed=0)
    llama = tmp_path / "llama"
    tiny_llama().save_pretrained(llama)
    _cut(llama / "model.safetensors")
    with pytest.raises(SystemExit, match="causal.teacher: the weights file"):
        causal_teacher.load(str(llama))
