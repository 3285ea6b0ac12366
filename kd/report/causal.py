"""The causal family's report: the original study's question asked of decoder LMs, from the causal stages' files.

Inputs are plain dicts (what causal_evaluate and causal_train wrote), so this module needs no
model. For each evaluated model: held-out perplexity, KL(teacher ‖ student) at T = 1 per
position, top-1 agreement with the teacher; for each arm: its training's logit loss and mean
gradient norm per layer (the original study's Figure 5); for each (logit-only, multi-loss) pair of arms: the
per-batch held-out KL difference with a 95 % paired interval over the test batches and the
verdict of the original study's claim "the multi-loss arm has the lower logit loss" (one seed: the
interval is over batches, not seeds), and the same for the mean gradient norm. Last, each
prompt's greedy continuation by the teacher, the initial student and every arm, side by side;
and the exported arm's numbers for its model card and registry entry (kd/report/card.py,
registry.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kd.report.report import fmt
from kd.report.seeds import paired, verdict

TEACHER = "teacher"


def is_logit_only(terms: Mapping[str, float]) -> bool:
    return [t for t, w in terms.items() if w > 0] == ["logit"]


def layer_norms(train: Mapping) -> dict[str, float]:
    """Mean gradient norm per student layer, in layer order."""
    keys = sorted((k for k in train if k.startswith("mean/grad_norm/layer_")),
                  key=lambda k: int(k.rsplit("_", 1)[1]))  # fmt: skip
    return {k.removeprefix("mean/grad_norm/"): train[k] for k in keys}


def metrics(evals: Mapping[str, Mapping], trains: Mapping[str, Mapping]) -> dict:
    """data/metrics/causal.json: the headline numbers, by model."""
    floor = next(iter(evals.values()))
    out: dict = {TEACHER: {"perplexity": floor["teacher_perplexity"]}}
    if "probe_linear_acc_teacher" in floor:
        out[TEACHER]["probe_linear_acc"] = floor["probe_linear_acc_teacher"]
    for name, e in evals.items():
        out[name] = {k: e[k] for k in ("perplexity", "kl_t1", "top1_agreement", "probe_linear_acc")
                     if k in e}  # fmt: skip
        if name in trains:
            t = trains[name]
            norms = list(layer_norms(t).values())
            out[name].update({
                "train_logit_loss": t.get("final/loss/logit"),
                "mean_grad_norm": sum(norms) / len(norms) if norms else None,
            })  # fmt: skip
    return out


def headline(metrics_: Mapping[str, Mapping], arm: str) -> dict:
    """The exported arm's numbers, as its model card and registry entry read them: its entry of
    causal.json, its name as ``scheme`` and the teacher's perplexity beside them."""
    return {"scheme": arm, **metrics_[arm], "teacher_perplexity": metrics_[TEACHER]["perplexity"]}


def comparisons(schemes: Mapping[str, Mapping[str, float]], batches: Mapping[str, Sequence],
                trains: Mapping[str, Mapping]) -> list[dict]:  # fmt: skip
    """Each (logit-only arm, multi-loss arm): the held-out KL difference per batch (multi −
    logit) with its paired 95 % interval, and the mean gradient norms."""
    base = [a for a in schemes if is_logit_only(schemes[a])]
    other = [a for a in schemes if not is_logit_only(schemes[a]) and "logit" in schemes[a]]
    out = []
    for lo in base:
        for mu in other:
            d = paired(batches[lo], batches[mu])
            norms = {a: list(layer_norms(trains[a]).values()) for a in (lo, mu)}
            mean = {a: sum(v) / len(v) for a, v in norms.items() if v}
            out.append({
                "base": lo, "other": mu, "test_kl": d,
                "test_kl_verdict": verdict(d.get("ci_low"), d.get("ci_high"), lower=True),
                "grad_norm": mean,
                "grad_norm_higher": mean.get(mu, 0) > mean.get(lo, 0),
            })  # fmt: skip
    return out


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(v if isinstance(v, str) else fmt(v) for v in r) + " |"
                    for r in rows] + [""]  # fmt: skip


def markdown(info: Mapping, evals: Mapping[str, Mapping], trains: Mapping[str, Mapping],
             compared: list[dict], texts: Mapping[str, list[str]], prompts: list[str]) -> str:
    """report.md of the causal experiment."""
    lines = [
        "# Causal-LM distillation: logit-only vs multi-loss",
        "",
        f"Teacher: {info['teacher']}; student: {info['student']}; {info['blocks']}.",
        "",
        "## Held-out scores",
        "",
    ]
    floor = next(iter(evals.values()))
    rows = [[TEACHER, floor["teacher_perplexity"], "–", "–", floor.get("probe_linear_acc_teacher")]]
    rows += [[n, e["perplexity"], e["kl_t1"], e["top1_agreement"], e.get("probe_linear_acc")]
             for n, e in evals.items()]  # fmt: skip
    lines += _table(["model", "perplexity", "KL(teacher ‖ model), T = 1", "top-1 agreement",
                     "linear probe"], rows)
    lines += ["## Training", ""]
    layers = sorted({k for t in trains.values() for k in layer_norms(t)},
                    key=lambda k: int(k.rsplit("_", 1)[1]))  # fmt: skip
    rows = [[a, t["steps"], t.get("final/loss/logit"), *(layer_norms(t).get(k) for k in layers)]
            for a, t in trains.items()]  # fmt: skip
    lines += _table(["arm", "steps", "final logit loss", *(f"grad norm {k}" for k in layers)],
                    rows)
    lines += ["## The original study's finding, for causal LMs", ""]
    if not compared:
        lines += ["The arms do not include a logit-only and a multi-loss arm: nothing to compare.", ""]
    for c in compared:
        d = c["test_kl"]
        lines += [
            f"- **{c['other']} vs {c['base']}, held-out KL at T = 1**: mean difference per test "
            f"batch {fmt(d.get('mean'))} (95 % paired interval {fmt(d.get('ci_low'))} to "
            f"{fmt(d.get('ci_high'))} over {d.get('n')} batches): the claim that the multi-loss "
            f"arm has the lower logit loss **{c['test_kl_verdict']}** on this seed.",
            f"- **Average gradient norm per layer**: {c['other']} "
            f"{fmt(c['grad_norm'].get(c['other']))} vs {c['base']} "
            f"{fmt(c['grad_norm'].get(c['base']))}: the multi-loss arm's is "
            f"{'higher, as the original study found' if c['grad_norm_higher'] else 'not higher'}.",
        ]
    lines += ["", "One seed: the intervals are over test batches. Over seeds, queue "
              "`dvc exp run --queue causal/dvc.yaml -S 'base.seed=1,2'`.", "",
              "## Continuations (greedy)", ""]  # fmt: skip
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}** …", ""]
        lines += _table(["model", "continuation"],
                        [[n, t[i].replace("|", "\\|").replace("\n", " ")] for n, t in texts.items()])
    return "\n".join(lines)
