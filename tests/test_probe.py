"""probe: the data, the split, mask-weighted features, the two measures and the stage, on a toy
three-topic set and tiny random BERTs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from tiny import TOPICS, tiny_bert, topic_folder, topic_texts

from kd.core.io import read_json
from kd.core.params import ParamsError, Probe, parse_params
from kd.core.runtime import set_seed
from kd.core.tracking import EXPERIMENT, STAGE_RUNS
from kd.distill.losses import mean_pool
from kd.probe import probe
from kd.report import report as kd_report

VOCAB = 30522  # the default tokenizer's: the toy topics are real words
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, default_tokenizer) -> dict:
    """Tiny random masked LMs saved like the pipeline's models, each with its tokenizer."""
    root = tmp_path_factory.mktemp("probe_models")
    dirs = {}
    for seed, name in enumerate(("teacher", "student_init", "logit", "multi")):
        hidden = 32 if name == "teacher" else 24
        path = root / name
        tiny_bert(hidden, 2, seed, VOCAB, hidden_dropout_prob=0.0).save_pretrained(path)
        default_tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="module")
def toy() -> probe.Labelled:
    texts, labels = topic_texts(40)
    return probe.Labelled(texts, np.asarray(labels), list(TOPICS))


def _features(model_dir, texts: list[str], batch_size: int = 16) -> np.ndarray:
    model, tok = probe.load_encoder(model_dir)
    return probe.features(model, probe.tokenize(tok, texts, 32), tok.pad_token_id, batch_size, CPU)


# --- data ---------------------------------------------------------------------------------


def test_split_is_stratified_deterministic_and_ignores_the_global_seed() -> None:
    labels = np.repeat([0, 1, 2], [50, 20, 7])
    set_seed(1)  # what base.seed does to every global RNG
    train, test = probe.split(labels, 0.2, seed=3)
    set_seed(2)
    again = probe.split(labels, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, test), again, strict=True))
    assert np.bincount(labels[test]).tolist() == [10, 4, 1]  # 20 % of each class
    assert sorted([*train, *test]) == list(range(len(labels)))
    other = probe.split(labels, 0.2, seed=4)[1]
    assert not np.array_equal(test, other)
    assert np.bincount(labels[other]).tolist() == [10, 4, 1]


def test_folder_decodes_latin1_drops_duplicates_and_sorts_classes(tmp_path) -> None:
    (tmp_path / "b_sport").mkdir()
    (tmp_path / "a_money").mkdir()
    (tmp_path / "a_money" / "1.txt").write_bytes(b"A \xa315.8m signing")  # Latin-1 pound sign
    (tmp_path / "a_money" / "2.txt").write_bytes("\ufeffcaf\u00e9 prices".encode())  # UTF-8 BOM
    (tmp_path / "a_money" / "3.txt").write_text("caf\u00e9  prices\n")  # a duplicate
    (tmp_path / "b_sport" / "1.txt").write_text("goal")
    (tmp_path / "b_sport" / "2.txt").write_text("match")
    (tmp_path / "b_sport" / "notes.md").write_text("ignored")
    data = probe.load(Probe(source="folder", folder=tmp_path))
    assert data.classes == ["a_money", "b_sport"]
    assert data.texts == ["A \u00a315.8m signing", "caf\u00e9 prices", "goal", "match"]
    assert data.labels.tolist() == [0, 0, 1, 1]


def test_max_examples_is_a_stratified_subsample(tmp_path) -> None:
    cfg = Probe(source="folder", folder=topic_folder(tmp_path, per_class=30), max_examples=30)
    data = probe.load(cfg)
    assert np.bincount(data.labels).tolist() == [10, 10, 10]
    assert probe.load(cfg).texts == data.texts
    few = probe.load(cfg.model_copy(update={"max_examples": 4}))  # still splittable
    assert np.bincount(few.labels).tolist() == [2, 2, 2]
    train, test = probe.split(few.labels, 0.2, seed=0)
    assert np.bincount(few.labels[train]).tolist() == np.bincount(few.labels[test]).tolist()


def test_bbc_offline_is_read_from_files() -> None:
    data = probe.load(Probe(max_examples=50))
    assert data.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(data.texts) == 50 and all(t.strip() for t in data.texts)


def test_a_folder_with_one_class_names_the_param(tmp_path) -> None:
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "1.txt").write_text("alone")
    with pytest.raises(SystemExit, match=r"probe\.folder: .* 1 class folder"):
        probe.load(Probe(source="folder", folder=tmp_path))


def test_a_class_too_small_to_split_names_the_param(tmp_path) -> None:
    topic_folder(tmp_path, per_class=3)
    for extra in ("1.txt", "2.txt"):  # two copies of one text: one distinct text
        (tmp_path / "tiny").mkdir(exist_ok=True)
        (tmp_path / "tiny" / extra).write_text("same words")
    with pytest.raises(SystemExit, match=r"probe\.folder: every class needs .*'tiny'"):
        probe.load(Probe(source="folder", folder=tmp_path))


def test_hf_dataset_and_an_unknown_column_names_the_param(tmp_path) -> None:
    import pandas as pd

    texts, labels = topic_texts(4)
    frame = pd.DataFrame({"body": texts, "topic": [list(TOPICS)[i] for i in labels]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    ok = Probe(source="hf", hf_name=str(tmp_path), text_column="body", label_column="topic")
    data = probe.load(ok)
    assert data.classes == sorted(TOPICS) and len(data.texts) == 12
    bad = ok.model_copy(update={"text_column": "text"})
    with pytest.raises(SystemExit, match=r"probe\.text_column is 'text'.*\['body', 'topic'\]"):
        probe.load(bad)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"source": "folder"}, "probe.folder"),
        ({"source": "hf"}, "probe.hf_name"),
        ({"finetune_steps": 5, "finetune_warmup_steps": 5}, "probe.finetune_warmup_steps"),
        ({"source": "bbc"}, "probe.source"),
        ({"test_fraction": 1.0}, "probe.test_fraction"),
    ],
)
def test_bad_probe_params_name_the_key(values, key) -> None:
    raw = {"loss": {"schemes": {"multi": {"terms": {"logit": 1.0}}}, "arms": ["multi"]}}
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params({**raw, "probe": values})


# --- features and the two measures --------------------------------------------------------


def test_features_are_mask_weighted_means(model_dirs) -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]

    short, long = "apple banana", "river mountain forest valley ocean desert island lake"
    alone = _features(model_dirs["teacher"], [short])
    padded = _features(model_dirs["teacher"], [long, short])  # the short text is padded
    assert np.allclose(padded[1], alone[0], atol=1e-5)
    assert not np.allclose(padded[0], padded[1])


def test_linear_probe_separates_topics_and_is_at_chance_on_shuffled_labels(
    model_dirs, toy
) -> None:
    x = _features(model_dirs["student_init"], toy.texts)
    train, test = probe.split(toy.labels, 0.3, seed=0)
    y = toy.labels
    assert probe.linear_probe(x[train], y[train], x[test], y[test], 1.0, 1000) >= 0.9
    shuffled = np.random.default_rng(0).permutation(y)
    chance = probe.linear_probe(x[train], shuffled[train], x[test], shuffled[test], 1.0, 1000)
    assert chance < 0.6  # 1/3 expected; 36 held-out texts


def _digest(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_finetune_runs_and_leaves_the_checkpoint_untouched(model_dirs, toy) -> None:
    model_dir = model_dirs["logit"]
    before = _digest(model_dir)
    _, tok = probe.load_encoder(model_dir)
    ids = probe.tokenize(tok, toy.texts, 32)
    train, test = probe.split(toy.labels, 0.3, seed=0)
    cfg = Probe(finetune_steps=3, finetune_batch_size=8, finetune_warmup_steps=1, batch_size=16)

    def run() -> probe.Finetuned:
        return probe.finetune(
            model_dir,
            [ids[i] for i in train],
            toy.labels[train],
            [ids[i] for i in test],
            toy.labels[test],
            len(toy.classes),
            tok.pad_token_id,
            cfg,
            CPU,
        )

    tuned = run()
    assert 0.0 <= tuned.accuracy <= 1.0
    assert len(tuned.losses) == 3 and all(np.isfinite(tuned.losses))
    assert run().losses == tuned.losses  # seeded by probe.seed
    assert _digest(model_dir) == before


# --- the stage and the report ---------------------------------------------------------------


def test_stage_scores_every_model_writes_metrics_and_tracks(
    tmp_path, monkeypatch, model_dirs
) -> None:
    from stages import probe as stage

    students = tmp_path / "students"
    students.mkdir()
    for arm in ("logit", "multi"):
        (students / arm).symlink_to(model_dirs[arm], target_is_directory=True)
    raw = {
        "base": {"precision": "fp32", "device": "cpu", "threads": 1},
        "paths": {
            "teacher": str(model_dirs["teacher"]),
            "student_init": str(model_dirs["student_init"]),
            "students": str(students),
            "metrics": str(tmp_path / "metrics"),
        },
        "loss": {
            "scheme": "multi",
            "arms": ["logit", "multi"],
            "schemes": {"logit": {"terms": {"logit": 1.0}}, "multi": {"terms": {"hidden": 1.0}}},
        },
        "probe": {
            "source": "folder",
            "folder": str(topic_folder(tmp_path / "topics", per_class=12)),
            "test_fraction": 0.25,
            "max_seq_length": 32,
            "batch_size": 8,
            "finetune_steps": 2,
            "finetune_batch_size": 4,
            "finetune_warmup_steps": 1,
        },
    }
    raw["paths"]["probe"] = str(tmp_path / "probe")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    for args in (["--teacher"], ["--init"], ["--arm", "logit"], ["--arm", "multi"]):
        stage.main(args)

    files = {n: tmp_path / "probe" / f"{n}.json" for n in ("teacher", "student_init", "logit",
                                                          "multi")}
    m = kd_report.read_probes({**files, "missing": tmp_path / "probe" / "nope.json"})
    assert (m["n_train"], m["n_test"], m["n_classes"]) == (27, 9, 3)
    assert m["classes"] == "fruit,music,nature" and m["dataset"] == "folder"
    for name in ("teacher", "student_init", "logit", "multi"):
        assert 0.0 <= m[f"{name}/linear_acc"] <= 1.0, name
        assert 0.0 <= m[f"{name}/finetune_acc"] <= 1.0, name
        written = read_json(files[name])
        assert "seconds" not in written  # wall time goes to MLflow only: the file is hashed
        assert written["runtime"]["threads"] == 1 and written["runtime"]["precision"] == "fp32"
    assert not any(k.startswith("missing/") for k in m)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], STAGE_RUNS)
    assert sorted(r.info.run_name for r in runs) == sorted(
        ["probe@teacher", "probe@student_init", "probe@logit", "probe@multi"]
    )
    multi = next(r for r in runs if r.info.run_name == "probe@multi")
    assert multi.data.metrics["linear_acc"] == m["multi/linear_acc"]
    assert "finetune_loss" in multi.data.metrics
    assert multi.data.metrics["time/seconds"] > 0 and multi.data.tags["runtime.threads"] == "1"

    keys, lines = kd_report.probe_results(m, ["logit", "multi"], "multi")
    assert keys["probe_linear_acc"] == keys["arms/multi/probe_linear_acc"] == m["multi/linear_acc"]
    assert keys["probe/teacher/finetune_acc"] == m["teacher/finetune_acc"]
    assert keys["floor/probe_linear_acc"] == m["student_init/linear_acc"]
    table = "\n".join(lines)
    assert "## Downstream probe" in table and "| multi (headline) |" in table
    assert kd_report.probe_results(None, ["logit", "multi"], "multi") == ({}, [])
    assert kd_report.read_probes({"x": tmp_path / "nope.json"}) is None


def test_stage_refuses_a_missing_model(tmp_path, monkeypatch) -> None:
    from stages import probe as stage

    raw = {
        "paths": {k: str(tmp_path / k) for k in ("teacher", "student_init", "students")},
        "loss": {"scheme": "multi", "arms": ["multi"], "schemes": {"multi": {"terms": {"logit": 1}}}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="teacher is missing: run the prepare_teacher stage first"):
        stage.main(["--teacher"])
    with pytest.raises(SystemExit, match="multi is missing: run the train@multi stage first"):
        stage.main(["--arm", "multi"])
