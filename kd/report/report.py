"""The experiment's result: headline metrics, the original study's figures, and what the numbers say.

Everything here reads the evaluate and train stages' outputs (kd/core/arms.py says where each trained
scheme's live); nothing is computed twice and no number in the text is written by
hand. "Logit loss" in the comparisons is the KL at T = 1 at the fixed masked positions
(``logit_kl_t1``) for every student, whatever positions and temperature its scheme trained with.
"Average gradient norm" is the original study's Figure 5 quantity: the per-layer gradient norms (before
clipping) of the student's transformer layers, averaged over layers and steps; the "global" norm
is over the student's own parameters (the projections have their own group).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from kd.core.arms import Outputs
from kd.core.io import atomic_dir, need, read_json
from kd.core.params import Scheme

# Keys that must exist for every arm in comparison.json, so every arm's block has them.
CORE_KEYS = (
    "train/logit_kl_train_t",
    "train/logit_kl_t1",
    "test/logit_kl_train_t",
    "test/logit_kl_t1",
    "train/mlm_top1",
    "test/mlm_loss",
    "test/mlm_top1",
    "test/mlm_top5",
    "test/agreement",
    "test/embedding_lstsq",
    "test/hidden_lstsq",
    "test/attention_probs",
    "mean_grad_norm",
    "mean_grad_norm_global",
)


@dataclass
class Arm:
    """One arm's outputs (or the initial student's, which has no training outputs)."""

    name: str
    scheme: Scheme | None
    eval: dict
    batches: pd.DataFrame
    train: dict | None = None
    steps: pd.DataFrame | None = None

    @property
    def multi_loss(self) -> bool:
        return self.scheme is not None and self.scheme.uses_intermediate


def load_arm(out: Outputs, scheme: Scheme | None) -> Arm:
    """Read a trained scheme's evaluate and train outputs; ``scheme`` None reads the floor (its
    evaluation only)."""
    arm = Arm(
        out.name,
        scheme,
        read_json(need(out.eval_json, out.eval_stage)),
        pd.read_csv(need(out.eval_csv, out.eval_stage)),
    )
    if scheme is not None:
        arm.train = read_json(need(out.train_json, out.train_stage))
        arm.steps = pd.read_csv(need(out.train_csv, out.train_stage))
    return arm


def layer_keys(train: dict) -> list[str]:
    """``mean/grad_norm/layer_<i>`` keys in layer order."""
    keys = [k for k in train if k.startswith("mean/grad_norm/layer_")]
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def arm_metrics(arm: Arm) -> dict[str, float | None]:
    """One arm's numbers under scheme-neutral keys."""
    out = {
        k: v
        for k, v in arm.eval.items()
        if k.startswith(("train/", "test/")) and (v is None or isinstance(v, int | float))
    }
    if arm.train is not None:
        layers = [arm.train[k] for k in layer_keys(arm.train)]
        out["mean_grad_norm"] = sum(layers) / len(layers) if layers else None
        out["mean_grad_norm_global"] = arm.train.get("mean/grad_norm/global")
        out["train_steps"] = arm.train.get("steps")
        out["train_flops"] = arm.train.get("flops")
        out["train_final_loss"] = arm.train.get("final/loss/total")
    return out


def _value(x) -> float:
    return math.nan if x is None else float(x)


def best(arms: list[Arm], key: str, lower: bool) -> tuple[str | None, dict[str, float]]:
    """The arm with the lowest (or highest) ``key``; None when tied or undefined."""
    values = {a.name: _value(arm_metrics(a).get(key)) for a in arms}
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    if not finite:
        return None, values
    top = (min if lower else max)(finite.values())
    winners = [k for k, v in finite.items() if math.isclose(v, top, rel_tol=1e-9, abs_tol=1e-12)]
    return (winners[0] if len(winners) == 1 else None), values


# The original study's three claims: the multi-loss arm has the lower train and test logit loss
# and the higher average gradient norm than the logit-only arm.
CLAIMS = (
    ("train/logit_kl_t1", True, "lower train logit loss"),
    ("test/logit_kl_t1", True, "lower test logit loss"),
    ("mean_grad_norm", False, "higher average gradient norm"),
)


def findings(arms: list[Arm]) -> dict:
    """Which arm wins each comparison, and whether the original study's finding holds for each
    (logit-only arm, multi-loss arm) pair."""
    out: dict = {}
    for key, lower, _ in CLAIMS:
        name = key.replace("/", "_").replace("_t1", "")
        out[f"findings/{'lower' if lower else 'higher'}_{name}"] = best(arms, key, lower)[0]
    pairs = [(lo, mu) for lo in arms if not lo.multi_loss for mu in arms if mu.multi_loss]
    for lo, mu in pairs:
        holds = []
        for key, lower, _ in CLAIMS:
            a, b = _value(arm_metrics(mu).get(key)), _value(arm_metrics(lo).get(key))
            holds.append(a < b if lower else a > b)
        out[f"findings/study_holds/{mu.name}_vs_{lo.name}"] = all(holds)
    return out


def comparison(arms: list[Arm], headline: str, floor: Arm | None = None) -> dict:
    """``data/metrics/comparison.json``: every number the report compares. The headline arm's
    keys, then ``arms/<arm>/...`` for every arm (every key in every block, null where it does
    not apply), ``floor/...`` for the initial student and ``findings/...``."""
    per_arm = {a.name: arm_metrics(a) for a in arms}
    keys = list(dict.fromkeys([*CORE_KEYS, *(k for m in per_arm.values() for k in m)]))
    full = {name: {k: m.get(k) for k in keys} for name, m in per_arm.items()}
    out: dict = {"scheme": headline, **full[headline]}
    for name, m in full.items():
        out.update({f"arms/{name}/{k}": v for k, v in m.items()})
    if floor is not None:
        out.update({f"floor/{k}": v for k, v in arm_metrics(floor).items()})
    out.update(findings(arms))
    return out


# What `dvc exp show` and `dvc metrics diff` compare: the headline scheme's scores under
# scheme-neutral keys, so the columns line up across experiments whatever their loss.scheme.
HEADLINE = (
    "train/logit_kl_t1",
    "test/logit_kl_t1",
    "test/mlm_top1",
    "test/agreement",
    "test/teacher_mlm_top1",
    "test/hidden_lstsq",
    "test/attention_probs",
    "mean_grad_norm",
    "train_final_loss",
    "probe_linear_acc",
    "probe_finetune_acc",
)
# What decided the numbers (kd.core.runtime.record), from the headline arm's evaluation.
RUNTIME = ("device", "precision", "threads", "torch", "transformers")


def headline_metrics(compared: dict, headline_arm: Arm) -> dict:
    """``data/metrics/eval.json`` (the one file declared as DVC metrics): the scheme's name,
    :data:`HEADLINE` from ``compared`` and :data:`RUNTIME`."""
    runtime = headline_arm.eval.get("runtime") or {}
    return {
        "scheme": compared["scheme"],
        **{k: compared.get(k) for k in HEADLINE},
        "runtime": {k: runtime.get(k) for k in RUNTIME},
    }


# --- figures ------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def figures(arms: list[Arm], out: Path) -> list[Path]:
    """The original study's Figures 2-5, plus the per-layer gradient norms, as PNGs in ``out``."""
    paths = []

    fig = Figure(figsize=(5.5 * len(arms), 4))
    for ax, arm in zip(fig.subplots(1, len(arms), squeeze=False)[0], arms, strict=True):
        terms = [c for c in arm.steps.columns if c.startswith("loss/") and c != "loss/total"]
        for col in terms:
            ax.plot(arm.steps["step"], arm.steps[col], label=col.removeprefix("loss/"))
        if len(terms) > 1:
            ax.plot(arm.steps["step"], arm.steps["loss/total"], "k--", label="total")
        if (arm.steps[terms] > 0).all().all():
            ax.set_yscale("log")
        ax.set(title=f"{arm.name}: loss components", xlabel="step", ylabel="loss")
        ax.legend()
    paths.append(_save(fig, out / "fig2_loss_components.png"))

    for n, split in ((3, "train"), (4, "test")):
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for arm in arms:
            rows = arm.batches[arm.batches["split"] == split]
            ax.plot(rows["batch"], rows["logit_kl_t1"], marker="o", ms=3, label=arm.name)
        ax.set(
            title=f"Logit loss (KL, T=1) per {split} batch",
            xlabel=f"{split} batch",
            ylabel="logit loss",
        )
        ax.legend()
        paths.append(_save(fig, out / f"fig{n}_{split}_logit_loss.png"))

    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for arm in arms:
        cols = [c for c in arm.steps.columns if c.startswith("grad_norm/layer_")]
        left.plot(arm.steps["step"], arm.steps[cols].mean(axis=1), label=arm.name)
        right.plot(arm.steps["step"], arm.steps["grad_norm/global"], label=arm.name)
    left.set(title="Average gradient norm over layers", xlabel="step", ylabel="gradient norm")
    right.set(title="Global gradient norm (before clipping)", xlabel="step")
    left.legend()
    right.legend()
    paths.append(_save(fig, out / "fig5_grad_norm.png"))

    groups = [
        "embeddings",
        *(k.removeprefix("mean/grad_norm/") for k in layer_keys(arms[0].train)),
        "head",
    ]
    fig = Figure(figsize=(max(6, 1.2 * len(groups) * len(arms) / 2 + 3), 4))
    ax = fig.subplots()
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        values = [_value(arm.train.get(f"mean/grad_norm/{g}")) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=arm.name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
    ax.set(title="Mean gradient norm per layer over training", ylabel="gradient norm")
    ax.legend()
    paths.append(_save(fig, out / "fig6_grad_norm_per_layer.png"))

    # Matched compute: the arms see the same tokens per step but not the same cost per step.
    # Model FLOPs (counted from shapes, kd/training/flops.py), not wall time: a figure DVC
    # hashes must come out the same on every run.
    with_logit = [a for a in arms if {"loss/logit", "tokens", "flops"} <= set(a.steps.columns)]
    if with_logit:
        fig = Figure(figsize=(11, 4))
        left, right = fig.subplots(1, 2)
        for arm in with_logit:
            left.plot(arm.steps["tokens"] / 1e6, arm.steps["loss/logit"], label=arm.name)
            right.plot(arm.steps["flops"] / 1e12, arm.steps["loss/logit"], label=arm.name)
        left.set(title="Training logit loss vs tokens seen", xlabel="tokens (millions)",
                 ylabel="logit loss (training T)")
        right.set(title="Training logit loss vs model FLOPs", xlabel="TFLOP")
        left.legend()
        right.legend()
        paths.append(_save(fig, out / "fig7_matched_compute.png"))

    for arm in (a for a in arms if attribution_terms(a)):
        paths.append(_attribution_figure(arm, out / f"fig8_attribution_{arm.name}.png"))
    return paths


def attribution_terms(arm: Arm) -> list[str]:
    """The terms whose own gradients were recorded during ``arm``'s training (kd/attribution)."""
    if arm.train is None:
        return []
    found = {k.split("/")[2] for k in arm.train if k.startswith("mean/attr/") and
             k.endswith("/global") and "/cos/" not in k}
    order = list(arm.scheme.active_terms) if arm.scheme else []
    return sorted(found, key=lambda t: (order.index(t) if t in order else len(order), t))


def _groups(arm: Arm) -> list[str]:
    layers = [k.removeprefix("mean/grad_norm/") for k in layer_keys(arm.train)]
    extra = [g for g in ("head", "projections", "connectors")
             if f"mean/grad_norm/{g}" in arm.train]
    return ["embeddings", *layers, *extra]


def _attribution_figure(arm: Arm, path: Path) -> Path:
    terms, groups = attribution_terms(arm), _groups(arm)
    fig = Figure(figsize=(12, 4))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(terms)
    for i, term in enumerate(terms):
        values = [_value(arm.train.get(f"mean/attr/{term}/{g}")) for g in groups]
        left.bar([j + i * width for j in range(len(groups))], values, width, label=term)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
    left.set(title=f"{arm.name}: each term's own gradient norm per group (mean)",
             ylabel="gradient norm")
    left.legend()
    cos_cols = [c for c in arm.steps.columns if c.startswith("attr/cos/")]
    rows = arm.steps.dropna(subset=cos_cols[:1])
    for col in cos_cols:
        right.plot(rows["step"], rows[col], marker="o", ms=3, label=col.removeprefix("attr/cos/"))
    right.axhline(0, color="k", lw=0.5)
    right.set(title="Cosine between terms' gradients (shared parameters)", xlabel="step",
              ylabel="cosine")
    right.legend(fontsize=7)
    return _save(fig, path)


def _attribution_section(arms: list[Arm]) -> list[str]:
    attributed = [a for a in arms if attribution_terms(a)]
    if not attributed:
        return []
    lines = [
        "## Which term drives which layer (gradient attribution)",
        "",
        "Every `train.attribution_every` steps each weighted term's own gradient was taken on the "
        "step's forward (kd/training/attribution.py; the terms' gradients sum to the training gradient). "
        "Norms before clipping, averaged over those steps; cosines over the parameters both "
        "terms reach (negative: the terms pull shared weights apart).",
        "",
    ]
    for arm in attributed:
        terms, groups = attribution_terms(arm), _groups(arm)
        layers = [g for g in groups if g.startswith("layer_")]
        lines += [f"**{arm.name}** ({fmt(arm.train.get('attribution_steps'))} steps attributed)", ""]
        lines += _table(
            ["term", *groups, "global"],
            [[t, *(arm.train.get(f"mean/attr/{t}/{g}") for g in [*groups, "global"])]
             for t in terms],
        )
        top = {
            g: max(terms, key=lambda t, g=g: _value(arm.train.get(f"mean/attr/{t}/{g}")))
            for g in layers
        }
        drivers = sorted(set(top.values()), key=list(top.values()).count, reverse=True)
        lines.append(
            "- Largest own gradient per transformer layer: "
            + ", ".join(f"{g}: **{t}**" for g, t in top.items())
            + f" ({', '.join(f'{t} in {list(top.values()).count(t)}' for t in drivers)} of "
            f"{len(layers)})."
        )
        cos = {k.removeprefix("mean/attr/cos/"): v for k, v in arm.train.items()
               if k.startswith("mean/attr/cos/")}
        if cos:
            fighting = [k for k, v in cos.items() if _value(v) < 0]
            lines.append(
                "- Mean cosines: " + ", ".join(f"{k} {fmt(v)}" for k, v in cos.items()) + ". "
                + (f"Pulling apart on average: {', '.join(fighting)}." if fighting
                   else "No pair pulls apart on average.")
            )
        lines.append("")
    return lines


# --- report.md ----------------------------------------------------------------------------


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in r) + " |" for r in rows
    ]
    return lines + [""]


def _winner_line(arms: list[Arm], key: str, lower: bool, what: str) -> str:
    name, values = best(arms, key, lower)
    listed = ", ".join(f"{k} {fmt(v)}" for k, v in values.items())
    if name is None:
        return f"- **{what}**: no single arm ({listed})."
    return f"- **{what.capitalize()}**: **{name}** ({listed})."


def _study_section(arms: list[Arm]) -> list[str]:
    lines = ["## The original study's finding", ""]
    pairs = [(lo, mu) for lo in arms if not lo.multi_loss for mu in arms if mu.multi_loss]
    if not pairs:
        return lines + [
            "The original study compares a logit-only arm with a multi-loss arm; this experiment's "
            "arms do not include one of each, so its finding cannot be checked here.",
            "",
        ]
    lines.append(
        "The original study found the multi-loss arm to have a lower logit loss on train and test "
        "batches and a higher average gradient norm than the logit-only arm (its Figures 3-5)."
    )
    lines.append("")
    for lo, mu in pairs:
        a, b = arm_metrics(mu), arm_metrics(lo)
        verdicts = []
        for key, lower, what in CLAIMS:
            x, y = _value(a.get(key)), _value(b.get(key))
            ok = x < y if lower else x > y
            verdicts.append(ok)
            lines.append(
                f"- {mu.name} has a {what} than {lo.name}: "
                f"**{'holds' if ok else 'does not hold'}** ({fmt(x)} vs {fmt(y)})."
            )
        n = sum(verdicts)
        if n == len(CLAIMS):
            verdict = "holds"
        elif n == 0:
            verdict = "does not hold: every claim is reversed or tied"
        else:
            verdict = f"does not hold in full ({n} of {len(CLAIMS)} claims hold)"
        lines += ["", f"For {mu.name} vs {lo.name}, the original study's finding **{verdict}**.", ""]
    return lines


def markdown(arms: list[Arm], headline: str, figs: list[Path], floor: Arm | None = None) -> str:
    m = {a.name: arm_metrics(a) for a in arms}
    judged = [*arms, *([floor] if floor else [])]
    fm = {a.name: arm_metrics(a) for a in judged}
    head = m[headline]
    lines = [
        "# Distillation report",
        "",
        f"Arms: {', '.join(a.name for a in arms)}; headline arm (`loss.scheme`): **{headline}**, "
        "exported as the distilled model. All numbers below are computed from the evaluate and "
        "train stages' outputs. Logit loss = KL(teacher ‖ student) at T = 1 on the fixed masked "
        f"positions; train = the first {fmt(head.get('train/batches'))} train batches, "
        f"test = {fmt(head.get('test/batches'))} test batches.",
        "",
        "## What the numbers say",
        "",
        _winner_line(arms, "train/logit_kl_t1", True, "lower train logit loss"),
        _winner_line(arms, "test/logit_kl_t1", True, "lower test logit loss"),
        _winner_line(arms, "mean_grad_norm", False, "higher average gradient norm"),
        "",
        *_study_section(arms),
        "## Logit loss (Figures 3 and 4)",
        "",
        *_table(
            [
                "student",
                "terms",
                "final T",
                "train KL (T=1)",
                "test KL (T=1)",
                "train KL (final T)",
                "test KL (final T)",
            ],
            [
                [
                    a.name,
                    ", ".join(a.scheme.active_terms) if a.scheme else "(initial)",
                    _value(a.eval.get("train_temperature")),
                    fm[a.name].get("train/logit_kl_t1"),
                    fm[a.name].get("test/logit_kl_t1"),
                    fm[a.name].get("train/logit_kl_train_t"),
                    fm[a.name].get("test/logit_kl_train_t"),
                ]
                for a in judged
            ],
        ),
    ]
    layers = layer_keys(arms[0].train)
    lines += [
        "## Gradient norms during training (Figure 5)",
        "",
        "Per-group L2 norms of the total loss's gradient before clipping, averaged over steps; "
        "*global* is over the student's own parameters, the same set in every arm. A "
        "multi-loss arm's total has more terms, so part of a larger norm is simply more loss.",
        "",
        *_table(
            [
                "arm",
                "steps",
                "avg over layers",
                "global",
                *(k.removeprefix("mean/grad_norm/") for k in layers),
            ],
            [
                [
                    a.name,
                    m[a.name].get("train_steps"),
                    m[a.name].get("mean_grad_norm"),
                    m[a.name].get("mean_grad_norm_global"),
                    *(a.train.get(k) for k in layers),
                ]
                for a in arms
            ],
        ),
        "## Masked-LM accuracy and agreement with the teacher (test batches)",
        "",
        *_table(
            ["model", "MLM loss", "top-1", "top-5", "top-1 agreement with teacher"],
            [
                [
                    a.name,
                    fm[a.name].get("test/mlm_loss"),
                    fm[a.name].get("test/mlm_top1"),
                    fm[a.name].get("test/mlm_top5"),
                    fm[a.name].get("test/agreement"),
                ]
                for a in judged
            ]
            + [
                [
                    "teacher",
                    head.get("test/teacher_mlm_loss"),
                    head.get("test/teacher_mlm_top1"),
                    head.get("test/teacher_mlm_top5"),
                    1.0,
                ]
            ],
        ),
    ]
    n_layers = len(arms[0].eval.get("layer_map") or [])
    lstsq_cols = [
        "test/embedding_lstsq",
        *(f"test/hidden_lstsq/layer_{i}" for i in range(1, n_layers + 1)),
        "test/hidden_lstsq",
        "test/attention_probs",
        "test/attention_scores",
    ]
    learned_cols = ["test/embedding_learned", "test/hidden_learned"]
    lines += [
        "## Intermediate fidelity (test batches)",
        "",
        "MSE to the teacher's representations over real tokens, with student layer i compared to "
        f"teacher layer {arms[0].eval.get('layer_map')}[i]. *lstsq*: through a least-squares "
        "linear map (with bias) fitted for every student the same way, on "
        f"{fmt(arms[0].eval.get('lstsq/fit_tokens'))} train "
        "tokens; *learned*: through the arm's own trained projections, where it has them. Hidden "
        "and attention totals sum the layers, as the training terms do.",
        "",
        *_table(
            [
                "student",
                "embedding",
                *(f"hidden L{i}" for i in range(1, n_layers + 1)),
                "hidden (sum)",
                "attention probs (sum)",
                "attention scores (sum)",
                "embedding (learned)",
                "hidden (learned, sum)",
            ],
            [[a.name, *(fm[a.name].get(k) for k in lstsq_cols + learned_cols)] for a in judged],
        ),
        *_attribution_section(arms),
        "## Figures",
        "",
        *(f"![{p.stem}]({p.name})" for p in figs),
        "",
    ]
    return "\n".join(lines)


def export(student_dir: Path, dest: Path, card=None, auto: str = "AutoModelForMaskedLM",
           files: tuple[Path, ...] | None = None) -> None:
    """Save the headline student (weights, tokenizer, ``files``: by default its kd_config.json)
    to ``dest``, with the model card ``card(model)`` returns as its README.md
    (kd/report/card.py). ``auto`` is the transformers class that loads it."""
    import transformers

    model = getattr(transformers, auto).from_pretrained(student_dir)
    tok = transformers.AutoTokenizer.from_pretrained(student_dir)
    if files is None:
        files = tuple(f for f in [student_dir / "kd_config.json"] if f.exists())
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(model), encoding="utf-8")
        for f in files:
            shutil.copy(f, tmp / f.name)


# --- the downstream probe (stages/probe.py) ------------------------------------------------


def read_probes(files: dict[str, Path]) -> dict | None:
    """The probe stages' per-model JSONs as one ``{"<model>/<metric>": value, ...}`` dict (plus
    the dataset's description, the same in every file); None when no model was probed."""
    found = {name: read_json(path) for name, path in files.items() if path.exists()}
    if not found:
        return None
    merged = {k: v for k, v in next(iter(found.values())).items()
              if k in ("dataset", "classes", "n_classes", "n_train", "n_test", "majority_acc")}
    for name, result in found.items():
        merged.update({f"{name}/{k}": v for k, v in result.items()
                       if k in ("linear_acc", "finetune_acc")})
    return merged


def probe_results(
    probe: dict | None, arms: list[str], headline: str, floor: str = "student_init"
) -> tuple[dict, list[str]]:
    """The probe's accuracies as ``eval.json`` keys, and a report.md section.

    Keys: ``probe/<model>/<metric>`` for the teacher, every arm and the floor;
    ``arms/<arm>/probe_<metric>`` and, for the headline arm, ``probe_<metric>``, beside the
    other per-arm and headline keys; ``floor/probe_<metric>``. Nothing when no probe ran
    (``probe`` None), so the report never depends on it.
    """
    if not probe:
        return {}, []
    metrics = ("linear_acc", "finetune_acc")
    models = ["teacher", *arms, floor]
    out: dict = {f"probe/{m}/{k}": probe.get(f"{m}/{k}") for m in models for k in metrics}
    for arm in arms:
        out.update({f"arms/{arm}/probe_{k}": probe.get(f"{arm}/{k}") for k in metrics})
    out.update({f"probe_{k}": probe.get(f"{headline}/{k}") for k in metrics})
    out.update({f"floor/probe_{k}": probe.get(f"{floor}/{k}") for k in metrics})
    lines = [
        "## Downstream probe",
        "",
        f"Text classification on `{probe.get('dataset')}` ({fmt(probe.get('n_classes'))} "
        f"classes: {probe.get('classes')}), {fmt(probe.get('n_train'))} train / "
        f"{fmt(probe.get('n_test'))} held-out texts; always answering the commonest class scores "
        f"{fmt(probe.get('majority_acc'))}. *Linear probe*: logistic regression on the frozen, "
        "mean-pooled final hidden states. *Fine-tune*: the encoder and a new head, a few steps.",
        "",
        *_table(
            ["model", "linear probe accuracy", "fine-tune accuracy"],
            [
                [m + (" (headline)" if m == headline else ""), *(probe.get(f"{m}/{k}") for k in metrics)]
                for m in models
            ],
        ),
    ]
    return out, lines
