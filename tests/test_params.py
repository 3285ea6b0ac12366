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


SEEDS = ["base.seed", "corpus.seed", "teacher.seed", "tokenize.mask_seed", "probe.seed"]


@pytest.mark.parametrize("dotted", SEEDS)
@pytest.mark.parametrize("value", [2**32, -1])
def test_a_seed_no_generator_takes_is_refused(raw, dotted, value) -> None:
    # numpy's np.random.seed (kd/core/runtime.py) takes 0 <= seed < 2**32 only.
    msg = _error(_broken(raw, dotted, value))
    assert f"- {dotted}:" in msg and ("4294967296" in msg or "greater than or equal to 0" in msg)


@pytest.mark.parametrize("dotted", SEEDS)
def test_the_largest_seed_is_accepted(raw, dotted) -> None:
    Params.model_validate(_broken(raw, dotted, 2**32 - 1))


@pytest.mark.parametrize(
    ("dotted", "value", "says"),
    [
        ("loss.schemes.multi.layer_map", [], "loss.schemes.multi.layer_map: is an empty list"),
        ("causal.student.layers", [], "causal.student.layers: is an empty list"),
        ("causal.schemes.multi.layer_map", [], "causal.schemes.multi.layer_map: is an empty list"),
        ("causal.evaluate.prompts", ["Once", " "], "causal.evaluate.prompts.1: is blank"),
        ("loss.schemes.multi.terms", {}, "loss.schemes.multi.terms: lists no term"),
        ("causal.schemes.logit.terms", {}, "causal.schemes.logit.terms: lists no term"),
    ],
)
def test_an_empty_list_is_one_problem_naming_the_key(raw, dotted, value, says) -> None:
    msg = _error(_broken(raw, dotted, value))
    assert "1 problem(s)" in msg and says in msg  # not one error per branch of a union


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("train:\n  lr: 0.1\nbase:\n  seed: 0\ntrain:\n  lr: 0.3\n",
         "the key train is given twice (lines 1 and 5)"),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "the key train.lr is given twice (lines 2 and 3)"),
        ("causal:\n  schemes:\n    logit:\n      terms: {logit: 1.0, logit: 2.0}\n",
         "the key causal.schemes.logit.terms.logit is given twice"),
    ],
)
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, says) -> None:
    """PyYAML keeps the last of two equal keys silently; DVC refuses the file. The gate must
    refuse it too, or it validates other params than the ones DVC would see."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert says in str(info.value) and str(path) in str(info.value)
    assert "delete one of them" in str(info.value)


def test_the_repository_params_have_no_key_twice() -> None:
    load_params(REPO_PARAMS)  # also: YAML anchors and merges stay allowed


def test_a_merge_key_is_not_a_duplicate(tmp_path) -> None:
    from kd.core.params import _duplicate_key

    text = "a: &x {k: 1}\nb:\n  <<: *x\n  j: 2\nc:\n  <<: *x\n  <<: *x\n"
    assert _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader)) is None


def test_a_scheme_outside_the_arms_is_refused_with_the_arms_it_should_join(raw) -> None:
    # No stage trains a scheme that is not an arm: the error gives the -S that makes it one.
    msg = _error(_broken(raw, "loss.scheme", "minilm"))
    assert "loss.scheme is 'minilm'" in msg and "not one of loss.arms" in msg
    assert "-S 'loss.arms=[logit,multi,minilm]'" in msg
    ok = _broken(_broken(raw, "loss.arms", ["logit", "multi", "minilm"]), "loss.scheme", "minilm")
    assert Params.model_validate(ok).loss.scheme == "minilm"


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
