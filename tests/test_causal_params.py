"""Bad causal params are refused by check_params, with the key and the fix, before any stage runs."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO
from tiny import tiny_llama, word_tokenizer

from kd.core.params import ParamsError, batch_split_problem, parse_params
from kd.preflight import causal as preflight

RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def causal_raw(**causal) -> dict:
    raw = copy.deepcopy(RAW)
    raw["probe"]["max_seq_length"] = 32  # the probe's texts fit the small Llama's 64 positions
    for key, value in causal.items():
        raw["causal"][key] = value
    return raw


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 4-block random Llama (2 heads, 64 positions, 64 words: the default top_k fits) and its
    tokenizer."""
    path = tmp_path_factory.mktemp("llama")
    tok = word_tokenizer(["a", "b", "c"])
    tiny_llama(layers=4, vocab=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def refused(raw) -> str:
    with pytest.raises(SystemExit) as err:
        preflight.check(parse_params(raw))
    return str(err.value)


def refused_params(raw) -> str:
    """A mistake only params.yaml can fix: a ParamsError (exit 2), not a plain SystemExit."""
    with pytest.raises(ParamsError) as err:
        preflight.check(parse_params(raw))
    return str(err.value)


def test_the_repository_params_are_valid_and_the_causal_gate_needs_its_section() -> None:
    p = parse_params(copy.deepcopy(RAW))
    assert p.causal.arms == ["logit", "multi"]
    raw = copy.deepcopy(RAW)
    del raw["causal"]
    assert "no `causal` section" in refused_params(raw)


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
    assert says in refused_params(raw)


def test_a_layer_map_of_the_wrong_length_is_refused(llama_dir) -> None:
    raw = causal_raw(teacher=str(llama_dir), block_size=16, student={"layers": 2, "config": None})
    raw["causal"]["schemes"]["multi"]["layer_map"] = [2, 3, 4]
    says = "causal.schemes.multi.layer_map [2, 3, 4] must name one teacher block"
    assert says in refused_params(raw)


def _small(llama_dir, **change) -> dict:
    """A valid causal setup on the small Llama (64 words, 64 positions), with ``change``."""
    return causal_raw(teacher=str(llama_dir), **{"block_size": 16,
                                                 "student": {"layers": 2, "config": None},
                                                 **change})  # fmt: skip


def test_a_top_k_within_the_vocabulary_passes_and_above_it_is_refused(llama_dir) -> None:
    preflight.check(parse_params(_small(llama_dir, top_k=64)))  # the whole vocabulary
    says = refused_params(_small(llama_dir, top_k=65))
    assert "causal.top_k=65 is more than the teacher's vocabulary of 64" in says
    assert "at most 64" in says


@pytest.mark.parametrize(
    ("change", "says"),
    [
        # A config student with fewer positions than the blocks or the probe's texts.
        ({"student": {"layers": None, "config": {"max_position_embeddings": 8}}},
         "causal.block_size=16 is longer than the 8 positions of the causal student"),
        ({"student": {"layers": None, "config": {"max_position_embeddings": 24}}},
         "probe.max_seq_length=32 is longer than the 24 positions of the causal student"),
        ({"student": {"layers": None, "config": {"vocab_size": 128}}},
         "causal.student.config.vocab_size=128"),
    ],
)
def test_a_config_student_must_fit_what_it_reads(llama_dir, change, says) -> None:
    assert says in refused_params(_small(llama_dir, **change))


def test_the_probe_texts_must_fit_the_teacher_unless_there_is_no_probe(llama_dir) -> None:
    raw = _small(llama_dir)
    raw["probe"]["max_seq_length"] = 128
    assert "probe.max_seq_length=128 is longer than the 64 positions" in refused_params(raw)
    raw["causal"]["probe_examples"] = 0
    preflight.check(parse_params(raw))


def _prompts(llama_dir, prompts: list[str], max_new_tokens: int) -> dict:
    raw = _small(llama_dir)
    raw["causal"]["evaluate"].update(prompts=prompts, max_new_tokens=max_new_tokens)
    return raw


def test_a_prompt_and_its_continuation_must_fit_the_positions(llama_dir) -> None:
    # The word tokenizer makes one token per word: 3 + 56 fit 64 positions (the byte bound,
    # 5 + 4 + 56, does not, so the tokenizer is asked), 9 + 56 do not.
    preflight.check(parse_params(_prompts(llama_dir, ["a b c"], 56)))
    says = refused_params(_prompts(llama_dir, ["a b c", "a b c a b c a b c"], 56))
    assert "causal.evaluate.prompts: prompt 1" in says and "is 9 tokens" in says
    assert "needs 65 positions, but the models have 64" in says and "at most 8 tokens" in says


def test_the_evaluate_stage_checks_the_prompts_too(llama_dir) -> None:
    from transformers import AutoTokenizer

    from kd.causal.evaluate import prompt_problem

    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert prompt_problem(tok, ["a b c"], 61, 64) is None  # exactly enough
    assert "needs 65 positions" in prompt_problem(tok, ["a b c"], 62, 64)


def test_a_truncated_teacher_weights_file_is_refused(llama_dir, tmp_path) -> None:
    import shutil

    cut = shutil.copytree(llama_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    says = refused(_small(cut))
    assert f"causal.teacher: the weights file {weights} is" in says
    assert "copy or download the model again" in says


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
        (lambda c: c["student"].update(layers=[]), "causal.student.layers: is an empty list"),
        (lambda c: c["schemes"]["multi"].update(layer_map=[]), "is an empty list"),
        (lambda c: c["evaluate"].update(prompts=[""]), "causal.evaluate.prompts.0: is blank"),
        (lambda c: c.update(train_blocks=3), "causal.train_blocks=3 is fewer than one step's"),
        (lambda c: c["cache"].update(batch_size=64, shard_blocks=32), "causal.cache.batch_size=64"),
        (lambda c: c["cache"].update(logprobs="int8"), "causal.cache.logprobs"),
    ],
)
def test_params_that_cannot_run_are_refused(change, says) -> None:
    raw = causal_raw()
    change(raw["causal"])
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert says in str(err.value)


def test_the_headline_arm_is_causal_scheme_or_the_first_arm() -> None:
    assert parse_params(causal_raw()).causal.headline == "logit"
    assert parse_params(causal_raw(scheme="multi")).causal.headline == "multi"
    assert parse_params(causal_raw(scheme=None, arms=["multi", "logit"])).causal.headline == "multi"


def test_the_causal_gate_splits_the_causal_batch_over_base_nproc() -> None:
    """causal.train's global batch over base.nproc processes, micro-batches within a share:
    refused by the causal pipeline's gate, before it loads anything; the MLM gate (which parses
    the same params.yaml) never reads causal.train."""
    from kd.preflight import causal as causal_gate

    raw = causal_raw()
    raw["base"] = {"nproc": 2}
    raw["causal"]["train"].update(batch_size=4, micro_batch_size=1)
    assert batch_split_problem(parse_params(raw).causal.train, 2) is None
    for change, says in (({"batch_size": 3}, "causal.train.batch_size=3 cannot be split evenly "
                                             "over base.nproc=2"),
                         ({"batch_size": 4, "micro_batch_size": 3},
                          "causal.train.micro_batch_size=3 does not divide the 2")):  # fmt: skip
        raw["causal"]["train"].update(change)
        p = parse_params(raw)  # the MLM gate's parse accepts it
        with pytest.raises(ParamsError, match=says):
            causal_gate.check(p)
