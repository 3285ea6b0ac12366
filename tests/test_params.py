from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kd.core.params import LOSS_TERMS, Params, ParamsError, load_params, parse_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(REPO_PARAMS.read_text())


def _broken(raw: dict, dotted: str, value) -> dict:
    """A deep copy of ``raw`` with ``dotted`` (e.g. 'train.lr') set to ``value``."""
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[leaf] = value
    return out


def _error(raw: dict) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def test_repository_params_validate() -> None:
    p = load_params(REPO_PARAMS)
    assert isinstance(p, Params)
    assert p.loss.scheme in p.loss.arms
    assert set(p.loss.arms) <= set(p.loss.schemes)


def test_params_error_is_a_system_exit_with_the_message(raw) -> None:
    # A stage that does not catch it exits with the paragraph, not a traceback.
    with pytest.raises(SystemExit) as info:
        parse_params(_broken(raw, "train.lr", "fast"))
    assert "train.lr" in str(info.value)


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("bogus", {"x": 1}, "bogus"),  # unknown top-level section
        ("train.lrr", 1e-3, "train.lrr"),  # misspelt nested key
        ("loss.schemes.multi.temprature", 2.0, "loss.schemes.multi.temprature"),
    ],
)
def test_unknown_key_is_named(raw, dotted, value, named) -> None:
    msg = _error(_broken(raw, dotted, value))
    assert named in msg
    assert "unknown key" in msg


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("train.lr", "fast"),  # wrong type
        ("train.batch_size", 2.5),  # not an integer
        ("base.device", "tpu"),  # not one of the Literal choices
        ("train.max_steps", -5),  # negative steps
        ("train.max_steps", 0),
        ("teacher.adapt_steps", -1),
        ("loss.schemes.logit.temperature", 0.0),  # temperature <= 0
        ("loss.schemes.multi.temperature", -1.0),
        ("corpus.test_fraction", 1.0),
        ("tokenize.mlm_probability", 0.0),
    ],
)
def test_bad_value_names_the_dotted_key(raw, dotted, value) -> None:
    msg = _error(_broken(raw, dotted, value))
    assert f"- {dotted}:" in msg
    assert repr(value) in msg  # shows what it got


def test_scheme_outside_the_arms_is_trained_besides_them(raw) -> None:
    ok = _broken(raw, "loss.scheme", "minilm")
    p = Params.model_validate(ok)
    assert p.loss.trained == [*raw["loss"]["arms"], "minilm"]
    ok = _broken(raw, "loss.scheme", "logit")
    assert Params.model_validate(ok).loss.trained == raw["loss"]["arms"]


def test_scheme_not_defined(raw) -> None:
    msg = _error(_broken(raw, "loss.scheme", "patient_kd"))
    assert "loss.scheme" in msg and "'patient_kd'" in msg
    assert "minilm" in msg  # the schemes it could be


def test_arm_not_a_scheme(raw) -> None:
    msg = _error(_broken(raw, "loss.arms", ["logit", "multi", "feature"]))
    assert "loss.arms" in msg
    assert "'feature'" in msg


def test_unknown_loss_term_lists_known_terms(raw) -> None:
    msg = _error(_broken(raw, "loss.schemes.multi.terms", {"hidden": 1.0, "contrastive": 1.0}))
    assert "loss.schemes.multi.terms" in msg
    assert "contrastive" in msg
    for term in LOSS_TERMS:
        assert term in msg


def test_all_zero_term_weights(raw) -> None:
    msg = _error(_broken(raw, "loss.schemes.logit.terms", {"logit": 0.0}))
    assert "loss.schemes.logit.terms" in msg


def test_n_docs_and_n_words_both_set(raw) -> None:
    bad = _broken(raw, "corpus.n_docs", 100)
    bad["corpus"]["n_words"] = 1000
    msg = _error(bad)
    assert "corpus.n_docs" in msg and "corpus.n_words" in msg


def test_text_source_without_text_path(raw) -> None:
    bad = _broken(raw, "corpus.source", "text")
    bad["corpus"]["text_path"] = None
    msg = _error(bad)
    assert "corpus.text_path" in msg


def test_hf_source_needs_a_size(raw) -> None:
    msg = _error(_broken(raw, "corpus.source", "hf"))
    assert "corpus.n_docs" in msg


def test_student_heads_must_divide_hidden(raw) -> None:
    msg = _error(_broken(raw, "student.num_attention_heads", 7))
    assert "student.num_attention_heads" in msg


def test_several_problems_are_all_reported(raw) -> None:
    bad = _broken(raw, "train.lrr", 1.0)
    bad["base"]["seed"] = -1
    msg = _error(bad)
    assert "2 problem(s)" in msg
    assert "train.lrr" in msg and "base.seed" in msg


def test_load_params_missing_file(tmp_path) -> None:
    missing = tmp_path / "params.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(missing)
    assert "not found" in str(info.value)
    assert str(missing) in str(info.value)


def test_load_params_invalid_yaml(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [1, 2\n  batch_size: 3\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "not valid YAML" in str(info.value)


def test_load_params_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "mapping" in str(info.value)


def test_load_params_reports_the_file(tmp_path, raw) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_broken(raw, "train.lrr", 1.0)))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "train.lrr" in str(info.value)
