"""Bad causal params are refused by check_params, with the key and the fix, before any stage runs."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO
from tiny import tiny_llama, word_tokenizer

from kd.core.params import ParamsError, parse_params
from kd.preflight import causal as preflight

RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def causal_raw(**causal) -> dict:
    raw = copy.deepcopy(RAW)
    raw["model"]["family"] = "causal"
    for key, value in causal.items():
        raw["causal"][key] = value
    return raw


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 4-block random Llama (2 heads, 64 positions) and its tokenizer."""
    path = tmp_path_factory.mktemp("llama")
    tok = word_tokenizer(["a", "b", "c"])
    tiny_llama(layers=4, vocab=8).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def refused(raw) -> str:
    with pytest.raises(SystemExit) as err:
        preflight.check(parse_params(raw))
    return str(err.value)


def test_the_repository_params_are_valid_and_the_mlm_family_checks_nothing_causal() -> None:
    p = parse_params(copy.deepcopy(RAW))
    assert p.model.family == "mlm" and p.causal.arms == ["logit", "multi"]
    preflight.check(p)  # returns without reading any causal model


def test_a_small_llama_folder_passes(llama_dir) -> None:
    raw = causal_raw(teacher=str(llama_dir), block_size=16, student={"layers": 2, "config": None})
    preflight.check(parse_params(raw))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"block_size": 128}, "causal.block_size=128 is longer than the 64 positions"),
        ({"student": {"layers": 9, "config": None}}, "more blocks than the teacher's 4"),
        ({"student": {"layers": [1, 5], "config": None}}, "more blocks than the teacher's 4"),
        ({"student": {"layers": None, "config": {"hidden_sise": 8}}}, "no field(s) hidden_sise"),
        ({"student": {"layers": None, "config": {"hidden_size": 12, "num_attention_heads": 4}}},
         "the student has 4 heads and the teacher 2"),
        ({"student": {"layers": None, "config": {"hidden_size": 10, "num_attention_heads": 4}}},
         "must be a multiple of num_attention_heads 4"),
    ],
)
def test_models_that_do_not_fit_are_refused(llama_dir, change, says) -> None:
    raw = causal_raw(teacher=str(llama_dir), **{"block_size": 16, **change})
    assert says in refused(raw)


def test_a_layer_map_of_the_wrong_length_is_refused(llama_dir) -> None:
    raw = causal_raw(teacher=str(llama_dir), block_size=16, student={"layers": 2, "config": None})
    raw["causal"]["schemes"]["multi"]["layer_map"] = [2, 3, 4]
    assert "causal.schemes.multi.layer_map [2, 3, 4] must name one teacher block" in refused(raw)


def test_an_encoder_is_not_a_causal_teacher(tiny_teacher_dir) -> None:
    assert "is not a causal LM" in refused(causal_raw(teacher=str(tiny_teacher_dir)))


def test_a_missing_folder_names_the_key(tmp_path) -> None:
    assert "causal.teacher" in refused(causal_raw(teacher=str(tmp_path / "nowhere")))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda c: c["student"].update(config={"hidden_size": 64}), "set exactly one of"),
        (lambda c: c["student"].update(layers=[3, 1]), "must be increasing"),
        (lambda c: c["schemes"]["logit"].update(temperature=2.0), "the teacher cache holds"),
        (lambda c: c["schemes"]["multi"]["terms"].update(minilm_value=1.0),
         "unknown causal loss term"),
        (lambda c: c["schemes"]["logit"].update(divergence="kl"), "divergence"),
        (lambda c: c.update(arms=["logit", "nope"]), "causal.arms names 'nope'"),
        (lambda c: c.update(scheme="nope"), "causal.scheme is 'nope', which is not a causal arm"),
        (lambda c: c.update(arms=["multi"]), "causal.scheme is 'logit'"),  # a scheme, not an arm
        (lambda c: c["train"].update(onpolicy=0.5, onpolicy_prompt=200), "onpolicy_prompt=200"),
        (lambda c: c["train"].update(lr=float("inf")), "finite"),
    ],
)
def test_params_that_cannot_run_are_refused(change, says) -> None:
    raw = causal_raw()
    change(raw["causal"])
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert says in str(err.value)


def test_the_causal_family_needs_its_section() -> None:
    raw = causal_raw()
    del raw["causal"]
    with pytest.raises(ParamsError, match="no `causal` section"):
        parse_params(raw)


def test_the_headline_arm_is_causal_scheme_or_the_first_arm() -> None:
    assert parse_params(causal_raw()).causal.headline == "logit"
    assert parse_params(causal_raw(scheme="multi")).causal.headline == "multi"
    assert parse_params(causal_raw(scheme=None, arms=["multi", "logit"])).causal.headline == "multi"
