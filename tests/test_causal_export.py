"""causal_report's export: the causal.scheme arm's student as a save_pretrained folder with its
model card, registered in MLflow; run on the files of tiny causal stages (a 2-of-4-block Llama)."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO
from tiny import tiny_llama, word_tokenizer

from kd.causal import students
from kd.core.io import read_json, write_json
from kd.report import card, registry

PROMPT = "The river"
WORDS = "The river was founded in the great flood of 1824 . A chemist celebrated its bridges".split()


def fake_causal_outputs(root) -> None:
    """What causal_teacher … causal_evaluate leave under data/causal for arms logit and multi,
    the multi arm's student a trained (here: cut, untrained) 2-of-4-block Llama."""
    data = root / "data" / "causal"
    tok = word_tokenizer(sorted(set(WORDS)))
    teacher = tiny_llama(layers=4, vocab=len(tok) + 2, seed=0)
    student = students.from_teacher_layers(teacher, [0, 3])
    student.generation_config.eos_token_id = None  # a random model may say EOS first
    student.save_pretrained(data / "train" / "multi")
    tok.save_pretrained(data / "train" / "multi")
    write_json(data / "teacher" / "kd_teacher.json",
               {"class": "LlamaForCausalLM", "parameters": teacher.num_parameters(), "layers": 4})
    write_json(data / "student_init" / "kd_student.json",
               {"kept_teacher_blocks": [1, 4], "config": None, "seed": None, "layers": 2,
                "parameters": student.num_parameters(), "weights_sha256": "0"})
    write_json(data / "tokens" / "stats.json", {"train": {"blocks": 24}, "test": {"blocks": 8}})
    for i, arm in enumerate(("logit", "multi")):
        write_json(data / "train" / arm / "train.json",
                   {"steps": 6, "tokens": 384, "final/loss/logit": 3.0 - i,
                    "mean/grad_norm/layer_0": 1.0 + i, "mean/grad_norm/layer_1": 2.0,
                    "layer_map": [1, 4] if arm == "multi" else None})
    for i, name in enumerate(("student_init", "logit", "multi")):
        where = data / "eval" / name
        write_json(where / "eval.json",
                   {"perplexity": 60.0 - 10 * i, "kl_t1": 2.0 - 0.5 * i, "top1_agreement": 0.1 * i,
                    "teacher_perplexity": 30.0, "probe_linear_acc": 0.5 + 0.1 * i,
                    "probe_linear_acc_teacher": 0.9})
        (where / "test.csv").write_text(f"kl_t1\n{2.0 - 0.5 * i}\n{2.1 - 0.5 * i}\n")
        texts = {name: ["on"]} | ({"teacher": ["on"]} if name == "student_init" else {})
        write_json(where / "continuations.json", {"prompts": [PROMPT], "text": texts})


def write_params(root, **causal) -> None:
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["paths"] = {"metrics": str(root / "data" / "metrics"), "causal": str(root / "data" / "causal")}
    raw["causal"].update(block_size=16, top_k=8, **causal)
    raw["causal"]["evaluate"]["prompts"] = [PROMPT]
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def exported_with_db(tmp_path_factory):
    """The exported folder and the MLflow database it was registered in (causal_report runs
    once for this module's tests)."""
    from stages import causal_report

    root = tmp_path_factory.mktemp("causal_export")
    fake_causal_outputs(root)
    write_params(root, scheme="multi")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # MLflow's artifacts land beside its database
        causal_report.main()
    return root / "data" / "causal" / "distilled", uri


@pytest.fixture
def exported(exported_with_db, monkeypatch):
    folder, uri = exported_with_db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return folder


def test_the_export_continues_a_prompt_in_a_text_generation_pipeline(exported) -> None:
    from transformers import pipeline

    assert read_json(exported / "kd_student.json")["kept_teacher_blocks"] == [1, 4]
    generate = pipeline("text-generation", model=str(exported))
    (out,) = generate(PROMPT, max_new_tokens=4, do_sample=False)
    text = out["generated_text"]
    assert text.startswith(PROMPT) and text[len(PROMPT):].strip(), text


def test_the_card_names_the_teacher_the_blocks_the_scheme_and_the_metrics(exported) -> None:
    text = (exported / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # teacher: default
    assert {"knowledge-distillation", "multi"} <= set(meta["tags"])
    kd = meta["distillation"]
    assert kd["teacher"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct (")
    assert kd["scheme"] == "multi" and kd["kept_teacher_blocks"] == [1, 4]
    assert kd["terms"] == {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logit": 1.0}
    assert kd["divergence"] == "forward_kl" and kd["layer_map"] == [1, 4]
    (index,) = meta["model-index"]
    assert index["name"] == "kd-causal-multi-student"
    got = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    head = read_json(exported.parents[2] / "data" / "metrics" / "causal.json")["multi"]
    for key, _, name in card.CAUSAL_METRICS[:3]:
        assert got[name] == round(head[key], 4), key
    assert got["the teacher's perplexity"] == 30.0 and got[card.PROBE_METRIC[2]] == 0.7
    assert "the teacher's blocks 1, 4 (1-based)" in text and "logit × 1" in text
    assert 'pipeline("text-generation", model=' in text


def test_it_is_registered_tagged_aliased_and_loads_back(exported) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    name = registry.CAUSAL.name
    assert name != registry.MLM.name
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.tags["kd.scheme"] == "multi" and version.tags["kd.dvc_exp"] == "workspace"
    assert version.tags["metric.kl_t1"] == "1.0000" and version.tags["metric.perplexity"] == "40.0000"
    assert client.get_model_version_by_alias(name, registry.ALIAS).version == version.version
    assert not client.search_model_versions(f"name = '{registry.MLM.name}'")
    generate = mlflow.transformers.load_model(f"models:/{name}@{registry.ALIAS}")
    (out,) = generate(PROMPT, max_new_tokens=2, do_sample=False)
    assert out["generated_text"].startswith(PROMPT)


@pytest.mark.parametrize(("source", "base"), [
    ("default", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M"),
    ("/models/llama", None),  # a folder is no hub name: the card names it in `distillation`
])  # fmt: skip
def test_base_model_is_the_teachers_hub_name(source, base) -> None:
    assert card.base_model(card.CAUSAL, source) == base
