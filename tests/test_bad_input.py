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
