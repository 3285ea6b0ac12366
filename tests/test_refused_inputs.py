"""Every class of bad input the pipeline refuses, and what it says (docs/faults.md's table).

Each case changes one thing in a small valid project (the tiny teacher, a tiny text corpus, a tiny
probe set) and runs the check_params gate, `kd.preflight`, in-process through the same
`kd.core.cli.run` every entry point uses. The refusal must be a SystemExit, which Python prints
as its message alone (no traceback), with a non-zero status, and the message must name the key or
file and the fix. The worst cases also go through a real `dvc repro` (tests/test_pipeline.py,
`test_bad_input_is_refused_before_dvc_deletes_anything`), which checks that every file under
data/ stays byte-identical.

docs/faults.md's table lists every case (a test checks it); `pytest -rA -k refused` prints each
message as it is today (shown with -s).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from kd.core import cli
from kd.preflight.__main__ import main as preflight_main
from kd.preflight.causal import main as causal_main


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, in a user's words
    change: Callable[[Path, dict], None]  # (project folder, params) -> None, in place
    says: tuple[str, ...]  # fragments the message must hold: the key or file, and the fix
    status: int | None = None  # 2: a params.yaml mistake (ParamsError), 1: anything else
    text: str = ""  # appended to params.yaml as written (what a dict cannot hold)


def _set(**dotted):
    """A change that sets dotted params keys (`train__lr` for train.lr)."""

    def change(_root: Path, raw: dict) -> None:
        for key, value in dotted.items():
            *sections, last = key.split("__")
            node = raw
            for s in sections:
                node = node.setdefault(s, {})
            node[last] = value

    return change


def _teacher_folder(keep: tuple[str, ...]):
    """teacher.source: a copy of the tiny teacher holding only the files ``keep``."""

    def change(root: Path, raw: dict) -> None:
        src, dest = Path(raw["teacher"]["source"]), root / "broken-teacher"
        dest.mkdir()
        for name in keep:
            shutil.copy(src / name, dest / name)
        raw["teacher"]["source"] = str(dest)

    return change


def _corpus(make: Callable[[Path], Path]):
    def change(root: Path, raw: dict) -> None:
        raw["corpus"]["text_path"] = str(make(root))

    return change


def _empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _csv_file(root: Path) -> Path:
    (root / "corpus.csv").write_text("text\nsome words\n")
    return root / "corpus.csv"


def _blank_file(root: Path) -> Path:
    (root / "blank.txt").write_text("  \n\n \t\n")
    return root / "blank.txt"


def _one_class_probe(root: Path, raw: dict) -> None:
    folder = root / "one-topic" / "sport"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("a match report\n")
    raw["probe"]["folder"] = str(folder.parent)


def _cut_teacher(root: Path, raw: dict) -> None:
    """teacher.source: a copy of the tiny teacher whose weights file was cut short."""
    _teacher_folder(("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"))(root, raw)  # fmt: skip
    weights = Path(raw["teacher"]["source"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _causal(**dotted):
    """The causal pipeline's params on a small random Llama (4 blocks, 2 heads, 64 words, 64 positions)
    with a word tokenizer, valid as it stands; then ``dotted`` keys as in :func:`_set`."""

    def change(root: Path, raw: dict) -> None:
        from tiny import tiny_llama, word_tokenizer

        folder = root / "llama"
        if not folder.exists():
            tiny_llama(layers=4, vocab=64).save_pretrained(folder)
            word_tokenizer(["the", "a", "of"]).save_pretrained(folder)
        raw["causal"].update(teacher=str(folder), block_size=16, train_blocks=24, test_blocks=4,
                             student={"layers": 2, "config": None})  # fmt: skip
        _set(**dotted)(root, raw)

    return change


def _causal_cut(root: Path, raw: dict) -> None:
    _causal()(root, raw)
    cut = shutil.copytree(root / "llama", root / "llama-cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-100])
    raw["causal"]["teacher"] = str(cut)


def _no_torchrun(root: Path, raw: dict) -> None:
    raw["base"]["nproc"] = 2
    os.environ["PATH"] = str(root)  # restored by the test's monkeypatch


CASES = [
    # --- the models: configs and tokenizers, read before any weights
    Case("teacher_config_only", "teacher.source is a folder holding only config.json",
         _teacher_folder(("config.json",)), ("teacher.source", "no model weights",
                                             "save_pretrained")),
    Case("teacher_without_tokenizer", "teacher.source has weights but no tokenizer files",
         _teacher_folder(("config.json", "model.safetensors")),
         ("teacher.source", "5 tokens", "30522", "tokenizer files")),
    Case("teacher_misspelt_hub_name", "teacher.source is a hub name that cannot be fetched",
         _set(teacher__source="bert-base-uncasedd"),
         ("teacher.source", "bert-base-uncasedd", "hub name")),
    Case("teacher_missing_path", "teacher.source is a path that does not exist",
         _set(teacher__source="./no/such/teacher"),
         ("teacher.source", "no/such/teacher", "does not exist")),
    Case("seq_over_positions", "tokenize.max_seq_length beyond the teacher's 512 positions",
         _set(tokenize__max_seq_length=1024),
         ("tokenize.max_seq_length=1024", "512 positions", "at most 512"), 2),
    Case("probe_seq_over_positions", "probe.max_seq_length beyond the models' positions",
         _set(probe__max_seq_length=2048), ("probe.max_seq_length=2048", "at most 512"), 2),
    # --- the causal pipeline's gate (causal_check_params, kd/preflight/causal.py)
    Case("causal_layers_empty", "causal.student.layers: []", _causal(causal__student__layers=[]),
         ("causal.student.layers", "empty list", "give a count of blocks"), 2),
    Case("causal_layers_past_teacher", "causal.student.layers names a block the teacher lacks",
         _causal(causal__student__layers=[1, 9]),
         ("causal.student.layers=[1, 9]", "teacher's 4", "lower it"), 2),
    Case("causal_config_heads", "a config student whose head count does not divide its width",
         _causal(causal__student={"layers": None, "config": {"num_attention_heads": 3}}),
         ("causal.student.config", "multiple of num_attention_heads 3"), 2),
    Case("causal_top_k_over_vocab", "causal.top_k above the teacher's vocabulary",
         _causal(causal__top_k=100), ("causal.top_k=100", "vocabulary of 64", "at most 64"), 2),
    Case("causal_prompt_over_positions", "an evaluation prompt and its continuation beyond the "
         "teacher's positions", _causal(causal__evaluate__max_new_tokens=60),
         ("causal.evaluate.prompts", "prompt 0", "64 (max_position_embeddings)",
          "lower max_new_tokens"), 2),
    Case("causal_blocks_beyond_corpus", "causal.train_blocks above what the corpus can pack",
         _causal(causal__train_blocks=100_000),
         ("causal.train_blocks=100000", "lower causal.train_blocks (below",
          "sample more text"), 1),
    Case("causal_teacher_weights_cut", "causal.teacher whose weights file was cut short",
         _causal_cut, ("causal.teacher", "model.safetensors",
                                                "copy or download the model again"), 1),
    Case("layer_map_past_teacher", "a layer map names a teacher layer that does not exist",
         _set(loss__schemes__multi__layer_map=[1, 9]), ("loss.schemes.multi", "layer"), 2),
    Case("layer_map_decreasing", "a layer map that goes back to a shallower teacher layer",
         _set(loss__schemes__multi__layer_map=[2, 1]),
         ("loss.schemes.multi", "decreases at student layer 2", "layer_map: uniform"), 2),
    Case("layer_map_empty", "an empty layer map", _set(loss__schemes__multi__layer_map=[]),
         ("loss.schemes.multi.layer_map", "empty list", "or use uniform"), 2),
    Case("heads_differ", "the attention term with a student of another head count",
         _set(student__num_attention_heads=4), ("student.num_attention_heads", "heads"), 2),
    Case("teacher_weights_cut", "teacher.source whose weights file was cut short",
         _cut_teacher, ("teacher.source", "model.safetensors", "header declares",
                        "copy or download the model again"), 1),
    # --- params.yaml: numbers and rules across sections
    Case("lr_infinite", "train.lr: .inf", _set(train__lr=float("inf")),
         ("train.lr", "finite number")),
    Case("epochs_infinite", "train.epochs: .inf with no max_steps",
         _set(train__epochs=float("inf"), train__max_steps=None),
         ("train.epochs", "finite number")),
    Case("micro_batch_not_divisor", "train.micro_batch_size does not divide train.batch_size",
         _set(train__micro_batch_size=3), ("train.micro_batch_size=3", "pick one of [1, 2, 4]")),
    Case("batch_not_split_over_nproc", "train.batch_size not divisible by base.nproc",
         _set(base__nproc=3), ("train.batch_size=4", "base.nproc=3", "multiple")),
    Case("all_weights_scheduled_to_zero", "weight schedules hold every term at 0",
         _set(loss__schemes__logit__weight_schedules={"logit": {"start": 0.0}}),
         ("loss.schemes.logit", "weight_schedules", "positive")),
    Case("test_fraction_too_large", "corpus.test_fraction: 0.9999",
         _set(corpus__test_fraction=0.9999), ("corpus.test_fraction", "use at most 0.5")),
    Case("latency_longer_than_blocks", "quantize.latency_seq_length > tokenize.max_seq_length",
         _set(quantize__latency_seq_length=64),
         ("quantize.latency_seq_length=64", "tokenize.max_seq_length=32", "at most")),
    Case("unknown_scheme", "loss.scheme names no scheme", _set(loss__scheme="nope"),
         ("loss.scheme", "define it under loss.schemes")),
    Case("misspelt_key", "a misspelt key", _set(train__lrr=1e-3), ("train.lrr", "spelling")),
    Case("key_twice", "a section given twice in params.yaml", _set(),
         ("the key train is given twice (lines", "delete one of them"), 2,
         text="train:\n  lr: 0.1\n"),
    Case("seed_too_large", "base.seed: 4294967296 (numpy takes seeds below 2**32)",
         _set(base__seed=2**32), ("base.seed", "less than 4294967296"), 2),
    Case("seed_negative", "base.seed: -1", _set(base__seed=-1),
         ("base.seed", "greater than or equal to 0"), 2),
    # --- the machine
    Case("cuda_without_gpu", "base.device: cuda on a machine without one",
         _set(base__device="cuda"), ("base.device", "set base.device: auto")),
    Case("nproc_beyond_cores", "base.nproc: 64 on a machine with fewer cores",
         _set(base__nproc=64, train__batch_size=64, causal__train__batch_size=64),
         ("base.nproc=64", "at most")),
    Case("nproc_without_torchrun", "base.nproc: 2 where torchrun is not on PATH",
         _no_torchrun, ("base.nproc=2", "torchrun", "base.nproc: 1")),
    # --- the inputs
    Case("text_path_missing", "corpus.text_path does not exist",
         _corpus(lambda root: root / "nowhere.txt"), ("corpus.text_path", "does not exist")),
    Case("text_path_empty_folder", "corpus.text_path is an empty folder",
         _corpus(_empty_folder), ("corpus.text_path", ".txt, .jsonl, .parquet")),
    Case("text_path_unsupported", "corpus.text_path is a .csv file",
         _corpus(_csv_file), ("corpus.text_path", ".txt, .jsonl, .parquet")),
    Case("text_path_blank", "corpus.text_path holds only whitespace",
         _corpus(_blank_file), ("corpus.min_chars", "check the source")),
    Case("n_docs_beyond_corpus", "corpus.n_docs above the corpus's documents",
         _set(corpus__n_docs=1000), ("corpus.n_docs=1000", "at most 30")),
    Case("too_little_text_for_a_step", "a corpus too small for one batch of train.batch_size",
         _set(corpus__n_docs=3, train__batch_size=64),
         ("train.batch_size=64", "sample more documents")),
    Case("probe_folder_one_class", "probe.folder with a single class",
         _one_class_probe, ("probe.folder", "at least 2")),
]


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_teacher_dir, tiny_text_corpus):
    """A valid tiny project in the working directory; returns (folder, params)."""
    from conftest import tiny_params
    from tiny import topic_folder

    raw = tiny_params(tiny_text_corpus, tiny_teacher_dir, topic_folder(tmp_path / "topics", 4))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # a case may empty it
    return tmp_path, raw


def refusal(root: Path, raw: dict, capsys, text: str = "", gate=preflight_main
            ) -> tuple[object, str]:  # fmt: skip
    """(exit status, what the user sees) of the check_params gate (or ``gate``) on ``raw`` (and
    ``text`` appended to its params.yaml)."""
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False) + text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        cli.run(gate)
    code = caught.value.code
    seen = code if isinstance(code, str) else capsys.readouterr().err
    return code, seen


def test_the_valid_project_passes(project) -> None:
    root, raw = project
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cli.run(preflight_main)
    assert (root / "data" / "params.ok").read_text() == "params.yaml is valid\n"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_the_key_and_the_fix(case, project, capsys) -> None:
    if case.id == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    if case.id == "nproc_without_torchrun" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: base.nproc: 2 is refused for the cores first")
    root, raw = project
    case.change(root, raw)
    causal = case.id.startswith("causal_")  # the causal pipeline's own gate
    code, seen = refusal(root, raw, capsys, case.text, causal_main if causal else preflight_main)
    print(f"| {case.what} | {' '.join(str(seen).split())} |")  # docs/faults.md's row (pytest -s)
    assert code not in (0, None)
    if case.status is not None:  # SystemExit(message) is printed by Python and exits 1
        assert (1 if isinstance(code, str) else code) == case.status, code
    for fragment in case.says:
        assert fragment in seen, f"{fragment!r} not in:\n{seen}"
    assert not (root / "data" / "params.ok").exists()
    assert not (root / "data" / "causal" / "params.ok").exists()


def test_the_valid_causal_project_passes(project) -> None:
    root, raw = project
    _causal()(root, raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cli.run(causal_main)
    assert (root / "data" / "causal" / "params.ok").exists()


def test_a_params_error_exits_2_and_other_refusals_1(project, capsys) -> None:
    root, raw = project
    assert refusal(root, {**raw, "trian": {}}, capsys)[0] == cli.PARAMS_EXIT
    raw["corpus"]["text_path"] = str(root / "nowhere.txt")
    code, _ = refusal(root, raw, capsys)
    assert isinstance(code, str)  # SystemExit(message): Python prints it and exits 1


@pytest.mark.parametrize(
    "module, argv, needs",
    [
        ("stages.tokenize_corpus", [], "sample_corpus"),
        ("stages.prepare_teacher", [], "tokenize"),
        ("stages.train", ["--arm", "logit"], "tokenize"),
        ("stages.evaluate", ["--arm", "logit"], "train@logit"),
        ("stages.probe", ["--teacher"], "prepare_teacher"),
        ("stages.report", [], "evaluate"),
        ("stages.quantize", [], "report"),
    ],
)
def test_a_stage_run_before_its_inputs_names_the_stage_to_run(
    module, argv, needs, project, monkeypatch
) -> None:
    """`python -m stages.X` in a project where nothing has run: one line naming what to run."""
    import importlib

    root, raw = project
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setattr(sys, "argv", [module, *argv])
    stage = importlib.import_module(module)
    with pytest.raises(SystemExit) as caught:
        cli.run(stage.main)
    assert isinstance(caught.value.code, str), caught.value.code
    assert needs in caught.value.code and "dvc repro" in caught.value.code


def test_the_faults_page_lists_every_case() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "faults.md").read_text()
    missing = [c.what for c in CASES if f"| {c.what} |" not in page]
    assert not missing, f"cases docs/faults.md's table of refused inputs lacks: {missing}"


def test_a_hub_corpus_or_probe_set_that_cannot_be_opened_is_one_paragraph() -> None:
    """`source: hf` is streamed by its own stage (the gate never touches the network): a name
    that cannot be opened there still ends in one paragraph, not datasets' traceback."""
    from kd.core.params import Corpus, Probe
    from kd.data import corpus
    from kd.probe import probe

    with pytest.raises(SystemExit, match="corpus.hf_name: cannot open 'no-one/no-such-corpus'"):
        corpus.sample(Corpus(source="hf", hf_name="no-one/no-such-corpus", n_docs=5), 0)
    with pytest.raises(SystemExit, match="probe.hf_name: cannot open 'no-one/no-such-set'"):
        probe.load(Probe(source="hf", hf_name="no-one/no-such-set"))
