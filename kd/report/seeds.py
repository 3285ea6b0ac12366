"""One experiment over several seeds: means, 95% intervals, and the original study's claims.

Queue the seeds, run them, then aggregate::

    dvc exp run --queue -S 'base.seed=1,2' && dvc queue start   # the workspace is seed 0
    python -m kd.report.seeds                                          # -> data/seeds/seeds.{json,md}

``base.seed`` moves the student's init, the training data order and the dynamic masks; the
corpus sample, the test set and the teacher keep their own seeds, so every run is scored on the
same test batches and the arms of one run share one initial student. That makes the runs
*paired* by seed: the multi − logit difference is taken within each seed, then averaged.

Which rows count: ``dvc exp show --json`` lists the workspace, the baseline commit and its
experiments. A row is kept when its params equal the workspace's in every key but ``base.seed``
and it has finished (no error, not queued or running, an ``eval.json`` in its metrics). A failed
experiment is listed *with its baseline's metrics*, so its numbers would silently duplicate
another seed: it is skipped on its error, never on its numbers. One row per seed: the
workspace's when it is among them (it is what the user sees), else the newest.

Each kept row's per-arm numbers come from the report's ``data/metrics/comparison.json`` as the
row's own commit holds it (``git show <rev>:...``; the workspace's from disk): the small results
are committed to git, so every experiment, queued ones included, carries its own.

Statistics, with n seeds and t = t_{0.975, n-1} (Student's t):
    mean, sample sd (ddof 1), 95% CI = mean ± t · sd / √n
and for a pair of arms, the same on the per-seed difference d_s = other_s − base_s, plus the
paired t-test's two-sided p (scipy.stats.ttest_rel). With 2 seeds t = 12.7, so only a
difference that barely moves between seeds can be told apart from 0: that is the honest answer.

Pairs: every (logit-only arm, other arm), the logit-only arms being those whose scheme
(``loss.schemes.<arm>.terms`` in the workspace's params) has ``logit`` as its one non-zero term;
when the params do not say, the arm named ``logit``. Each claim of the original study
(kd.report.report.CLAIMS: lower train and test logit loss, higher average gradient norm for the
multi-loss arm) gets a verdict from the difference's CI: "holds" when it lies entirely on the
claimed side of 0, "reversed" when entirely on the other side, "not distinguishable" otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from scipy import stats

from kd.core import cli
from kd.core.io import atomic_file, write_json
from kd.core.tracking import flatten, repo_root, start_run
from kd.report.report import CLAIMS, fmt

SEED_KEY = "base.seed"
LEVEL = 0.95
# Per-arm keys of data/metrics/comparison.json that are aggregated, besides any `probe_*` key.
HEADLINE = (
    "train/logit_kl_t1",
    "test/logit_kl_t1",
    "test/mlm_top1",
    "mean_grad_norm",
    "test/hidden_lstsq",
)
PROBE_PREFIX = "probe_"
METRICS_DIR = "data/metrics"  # params.yaml's paths.metrics, when a row's params lack it
COMPARISON = "comparison.json"  # the report's per-arm numbers, beside eval.json
QUEUE_HINT = "dvc exp run --queue -S 'base.seed=1,2' && dvc queue start"
HOLDS, REVERSED, UNCLEAR = "holds", "reversed", "not distinguishable"


@dataclass(frozen=True)
class Family:
    """Where a model family's per-run numbers are and which claims are judged (``--family``)."""

    name: str
    metrics_file: str  # the headline metrics file a finished row has, under paths.metrics
    comparison_file: str  # the per-arm numbers of a row's commit
    arms_key: str  # the params key listing the arms
    schemes_key: str  # the params key holding each arm's scheme
    headline: tuple[str, ...]
    claims: tuple[tuple[str, bool, str], ...]
    target: str = ""  # the pipeline `dvc exp run` names ("" for dvc.yaml)

    def flat(self, content: Mapping) -> dict:
        """The comparison file as ``arms/<arm>/<key>`` values (the MLM report's own form)."""
        if self.name == "mlm":
            return dict(content)
        # causal.json: {model: {key: value}}; the arms only (not the teacher or the floor).
        return {f"arms/{m}/{k}": v for m, d in content.items() if isinstance(d, Mapping)
                for k, v in d.items() if m not in ("teacher", "student_init")}  # fmt: skip

    @property
    def queue_hint(self) -> str:
        target = f"{self.target} " if self.target else ""
        return f"dvc exp run --queue {target}-S 'base.seed=1,2' && dvc queue start"


MLM = Family("mlm", "eval.json", COMPARISON, "loss.arms", "loss.schemes", HEADLINE, CLAIMS)
CAUSAL = Family(
    "causal", "causal.json", "causal.json", "causal.arms", "causal.schemes",
    ("kl_t1", "perplexity", "top1_agreement", "train_logit_loss", "mean_grad_norm"),
    (("train_logit_loss", True, "lower train logit loss"),
     ("kl_t1", True, "lower test logit loss (KL at T = 1)"),
     ("mean_grad_norm", False, "higher average gradient norm")),
    target="causal/dvc.yaml",
)  # fmt: skip
FAMILIES = {f.name: f for f in (MLM, CAUSAL)}


# --- rows of `dvc exp show --json` -----------------------------------------------------------


@dataclass
class Row:
    """One row of ``dvc exp show``: the workspace, a commit or an experiment."""

    rev: str
    name: str | None
    timestamp: str | None
    error: str | None
    state: str | None  # the queue's executor state (queued, running, success, failed), if any
    params: dict[str, object]  # params.yaml, flattened to dotted keys
    metrics: dict | None  # eval.json's keys, None when the row has none
    comparison: dict | None = None  # its commit's comparison.json (with_comparisons)

    @property
    def label(self) -> str:
        return self.name or (self.rev if self.rev == "workspace" else self.rev[:7])

    @property
    def seed(self):
        return self.params.get(SEED_KEY)


def _row(node: Mapping, state: str | None, family: Family = MLM) -> Row:
    data = node.get("data") or {}
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    path = f"{params.get('paths.metrics', METRICS_DIR)}/{family.metrics_file}"
    metrics = ((data.get("metrics") or {}).get(path) or {}).get("data") or None
    if metrics is not None and not any(_number(v) is not None for v in flatten(metrics).values()):
        metrics = None  # a note, no numbers
    error = node.get("error") or data.get("error")
    if isinstance(error, Mapping):
        error = error.get("msg") or str(error)
    return Row(
        rev=str(node["rev"]),
        name=node.get("name"),
        timestamp=data.get("timestamp"),
        error=error or None,
        state=state,
        params=params,
        metrics=metrics,
    )


def parse_rows(tree, family: Family | None = None) -> list[Row]:
    """Every row of a ``dvc exp show --json`` tree, in its order.

    A row is any object with ``rev`` and ``data``; its experiments sit in
    ``experiments: [{"executor": ..., "revs": [row, ...]}, ...]``, walked to any depth.
    """
    rows: list[Row] = []

    def walk(node, state: str | None) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, state)
        elif isinstance(node, Mapping):
            executor = node.get("executor")
            if isinstance(executor, Mapping):
                state = executor.get("state")
            if "rev" in node and "data" in node:
                rows.append(_row(node, state, family or MLM))
            for key in ("experiments", "revs"):
                walk(node.get(key), state)

    walk(tree, None)
    return rows


def exp_show(cwd: Path | None = None) -> list:
    """``dvc exp show --json --all-commits`` in the repository root, through this interpreter's
    DVC. Every commit's experiments, not only HEAD's: a seed queued before a commit that left
    the params alone (a README edit, say) is still a run of this experiment, and the params
    comparison below decides which rows belong."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--all-commits"]
    out = subprocess.run(cmd, cwd=cwd or repo_root(), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"`dvc exp show --json` failed ({out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout)


def comparison_at(row: Row, root: Path, family: Family | None = None) -> dict | None:
    """The report's comparison.json (the family's) as ``row``'s commit holds it (the
    workspace's: on disk), as ``arms/<arm>/<key>`` values."""
    family = family or MLM
    rel = f"{row.params.get('paths.metrics', METRICS_DIR)}/{family.comparison_file}"
    if row.rev == "workspace":
        path = root / rel
        return family.flat(json.loads(path.read_text())) if path.exists() else None
    out = subprocess.run(
        ["git", "show", f"{row.rev}:{rel}"], cwd=root, capture_output=True, text=True
    )
    return family.flat(json.loads(out.stdout)) if out.returncode == 0 else None


def with_comparisons(rows: Sequence[Row], root: Path | None = None,
                     family: Family | None = None) -> list[Row]:  # fmt: skip
    """``rows`` with each finished one's comparison filled in."""
    root = root or repo_root()
    return [replace(r, comparison=comparison_at(r, root, family)) if r.metrics else r
            for r in rows]  # fmt: skip


# --- which rows count ------------------------------------------------------------------------


@dataclass
class Selection:
    rows: list[Row]  # one per seed, by seed
    reference: Row  # the workspace: the experiment being repeated
    notes: list[str]  # why each other row was skipped, which duplicates were dropped


def _differs(params: Mapping, reference: Mapping) -> list[str]:
    keys = (set(params) | set(reference)) - {SEED_KEY}
    return sorted(k for k in keys if params.get(k, "<absent>") != reference.get(k, "<absent>"))


def _skip_reason(row: Row, reference: Row, family: Family | None = None) -> str | None:
    family = family or MLM
    if row.error:
        return f"failed ({row.error})"
    if row.state in ("queued", "running", "failed"):
        return row.state
    if not row.metrics:
        return f"no {family.metrics_file} in its metrics (not run?)"
    made = row.metrics.get("seed", row.seed)
    if made != row.seed:  # the other family's pipeline ran for this row, not this one
        return (f"its {family.metrics_file} was made with {SEED_KEY}={made}: the {family.name} "
                "pipeline did not run for it")
    if not row.comparison:
        return (f"its commit holds no {METRICS_DIR}/{family.comparison_file} (run before the results were "
                "committed to git?)")
    if row.seed is None:
        return f"no {SEED_KEY} in its params"
    diff = _differs(row.params, reference.params)
    if diff:
        shown = ", ".join(
            f"{k}={row.params.get(k, '<absent>')!r} (workspace {reference.params.get(k, '<absent>')!r})"
            for k in diff[:3]
        )
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        return f"params differ beyond {SEED_KEY}: {shown}{more}"
    return None


def _skipped(reason: str, group: list[Row], shown: int = 3) -> list[str]:
    """One note per reason: every commit older than the family's metrics file (an
    ``--all-commits`` walk lists dozens) says the same thing once, not once per commit."""
    if len(group) <= shown:
        return [f"skipped {r.label} (seed {r.seed}): {reason}" for r in group]
    names = ", ".join(r.label for r in group[:shown])
    return [f"skipped {len(group)} rows ({names} and {len(group) - shown} more): {reason}"]


def select(rows: Sequence[Row], min_seeds: int = 2, family: Family | None = None) -> Selection:
    """The rows that repeat the workspace's experiment, one per seed (module docstring); for
    the causal family, the rows whose causal.json was made with their own seed."""
    family = family or MLM
    if not rows:
        raise SystemExit("`dvc exp show --json` listed no rows: is this a DVC repository?")
    reference = next((r for r in rows if r.rev == "workspace"), rows[0])
    by_reason: dict[str, list[Row]] = {}
    by_seed: dict[object, list[Row]] = {}
    for row in rows:
        reason = _skip_reason(row, reference, family)
        if reason:
            by_reason.setdefault(reason, []).append(row)
        else:
            by_seed.setdefault(row.seed, []).append(row)
    notes = [note for reason, group in by_reason.items() for note in _skipped(reason, group)]
    kept = []
    for seed, group in by_seed.items():
        # The workspace first, then newest first (ISO timestamps sort as strings).
        group = sorted(group, key=lambda r: (r.rev == "workspace", r.timestamp or ""), reverse=True)
        kept.append(group[0])
        if len(group) > 1:
            why = "the workspace's" if group[0].rev == "workspace" else "the newest"
            dropped = ", ".join(r.label for r in group[1:])
            notes.append(
                f"seed {seed} ran {len(group)} times with the same params: kept {why} "
                f"({group[0].label}), skipped {dropped}"
            )
    kept.sort(key=lambda r: r.seed)
    if len(kept) < min_seeds:
        listed = "\n".join(f"  {n}" for n in notes) or "  (no other rows)"
        raise SystemExit(
            f"{len(kept)} seed(s) of this experiment found, at least {min_seeds} needed. "
            f"Queue more with `{family.queue_hint}`, then rerun `python -m kd.report.seeds"
            f"{'' if family is MLM else ' --family ' + family.name}`.\n{listed}"
        )
    return Selection(kept, reference, notes)


# --- statistics (pure) -----------------------------------------------------------------------


def _number(v) -> float | None:
    # bool is an int, but a True in a metrics file is a finding, not a measurement.
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _finite(values: Iterable) -> list[float]:
    return [x for x in map(_number, values) if x is not None]


def summarize(values: Iterable, level: float = LEVEL) -> dict:
    """n, mean, sample sd and the Student's t interval mean ± t_{(1+level)/2, n-1}·sd/√n."""
    x = _finite(values)
    n = len(x)
    out = {"n": n, "mean": None, "sd": None, "half_width": None, "ci_low": None, "ci_high": None}
    if n == 0:
        return out
    mean = sum(x) / n
    out["mean"] = mean
    if n < 2:
        return out
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    out.update(sd=sd, half_width=half, ci_low=mean - half, ci_high=mean + half)
    return out


def paired(base: Sequence, other: Sequence, level: float = LEVEL) -> dict:
    """``summarize`` of the per-seed differences other − base, plus the paired t-test's t and
    two-sided p; seeds where either value is missing are left out."""
    both = [(_number(a), _number(b)) for a, b in zip(base, other, strict=True)]
    pairs = [(a, b) for a, b in both if a is not None and b is not None]
    diffs = [b - a for a, b in pairs]
    out = {**summarize(diffs, level), "diffs": diffs, "t": None, "p": None}
    if len(pairs) >= 2 and out["sd"]:
        test = stats.ttest_rel([b for _, b in pairs], [a for a, _ in pairs])
        out.update(t=float(test.statistic), p=float(test.pvalue))
    return out


def verdict(ci_low: float | None, ci_high: float | None, lower: bool) -> str:
    """Is the difference (other − base) on the claimed side of 0: below it when ``lower``?"""
    if ci_low is None or ci_high is None:
        return UNCLEAR
    below, above = ci_high < 0, ci_low > 0
    if below or above:
        return HOLDS if below == lower else REVERSED
    return UNCLEAR


# --- per-arm values and the aggregate ----------------------------------------------------------


def arm_names(rows: Sequence[Row], params: Mapping, family: Family | None = None) -> list[str]:
    """Arms with ``arms/<arm>/...`` keys in any row; the params' arm order first."""
    found = {k.split("/")[1] for r in rows for k in r.comparison if k.startswith("arms/")}
    listed = [a for a in params.get((family or MLM).arms_key) or [] if a in found]
    return listed + sorted(found - set(listed))


def metric_names(rows: Sequence[Row], arm: str, family: Family | None = None) -> list[str]:
    prefix = f"arms/{arm}/"
    probes = {
        k.removeprefix(prefix)
        for r in rows
        for k in r.comparison
        if k.startswith(prefix + PROBE_PREFIX)
    }
    return [*(family or MLM).headline, *sorted(probes)]


def logit_only(arm: str, params: Mapping, family: Family | None = None) -> bool:
    """Is ``logit`` the arm's one non-zero loss term (module docstring)?"""
    prefix = f"{(family or MLM).schemes_key}.{arm}.terms."
    terms = {k.removeprefix(prefix) for k, w in params.items() if k.startswith(prefix) and w}
    if not terms:
        return arm == "logit"  # the params do not describe it: go by the default arm's name
    return terms == {"logit"}


def arm_pairs(arms: Sequence[str], params: Mapping, family: Family | None = None
              ) -> list[tuple[str, str]]:  # fmt: skip
    """(logit-only arm, other arm) for every other arm that is not logit-only."""
    base = [a for a in arms if logit_only(a, params, family)]
    return [(b, o) for b in base for o in arms if o not in base]


def aggregate(selection: Selection, level: float = LEVEL, family: Family | None = None) -> dict:
    """Everything seeds.json holds."""
    family = family or MLM
    rows, params = selection.rows, selection.reference.params
    arms = arm_names(rows, params, family)

    def values(arm: str, key: str) -> list:
        return [r.comparison.get(f"arms/{arm}/{key}") for r in rows]

    per_arm = {
        arm: {
            key: {**summarize(values(arm, key), level), "values": values(arm, key)}
            for key in metric_names(rows, arm, family)
        }
        for arm in arms
    }
    pairs = {}
    for base, other in arm_pairs(arms, params, family):
        keys = [k for k in per_arm[other] if k in per_arm[base]]
        diffs = {k: paired(values(base, k), values(other, k), level) for k in keys}
        claims = {
            key: {
                "claim": f"{other} has a {what} than {base}",
                "lower": lower,
                "verdict": verdict(diffs[key]["ci_low"], diffs[key]["ci_high"], lower),
            }
            for key, lower, what in family.claims
            if key in diffs
        }
        pairs[f"{other}_vs_{base}"] = {
            "base": base,
            "other": other,
            "difference": f"{other} - {base}",
            "metrics": diffs,
            "claims": claims,
        }
    n = len(rows)
    return {
        "family": family.name,
        "level": level,
        "t_factor": float(stats.t.ppf((1 + level) / 2, n - 1)),
        "seeds": [r.seed for r in rows],
        "runs": [
            {
                "seed": r.seed,
                "label": r.label,
                "name": r.name,
                "rev": r.rev,
                "timestamp": r.timestamp,
            }
            for r in rows
        ],
        "notes": selection.notes,
        "arms": per_arm,
        "pairs": pairs,
    }


# --- seeds.md --------------------------------------------------------------------------------


def _pm(s: Mapping) -> str:
    if s["half_width"] is None:
        return fmt(s["mean"])
    return f"{fmt(s['mean'])} ± {fmt(s['half_width'])}"


def _ci(s: Mapping) -> str:
    if s["ci_low"] is None:
        return f"n = {s['n']}, no interval"
    return f"95% CI [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"


def markdown(result: Mapping) -> str:
    n, t = len(result["seeds"]), result["t_factor"]
    runs = ", ".join(f"{r['label']} (seed {r['seed']})" for r in result["runs"])
    lines = [
        f"# The {'causal ' if result.get('family') == 'causal' else ''}experiment over {n} seeds",
        "",
        f"Runs: {runs}. Each cell is mean ± the 95% confidence interval's half-width, "
        f"t_{{0.975,{n - 1}}} · sd / √{n} with t = {t:.3f} (Student's t).",
        "",
    ]
    if n < 5:
        lines += [
            f"With {n} seeds the interval is {t / math.sqrt(n):.1f} × sd wide on each side: only "
            "a difference that barely moves between seeds can be told apart from 0, so "
            f'"{UNCLEAR}" is often the honest answer. Queue more seeds to narrow it '
            f"(`{FAMILIES[result.get('family', 'mlm')].queue_hint.replace('1,2', '3,4')}`).",
            "",
        ]
    for arm, metrics in result["arms"].items():
        lines += [f"## {arm}", "", "| metric | mean ± 95% CI | sd | n |", "|---|---|---|---|"]
        lines += [f"| {k} | {_pm(s)} | {fmt(s['sd'])} | {s['n']} |" for k, s in metrics.items()]
        lines.append("")
    for pair in result["pairs"].values():
        claims = pair["claims"]
        lines += [
            f"## {pair['other']} − {pair['base']}, paired by seed",
            "",
            "| metric | mean difference ± 95% CI | p (paired t) | n | claim | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for key, s in pair["metrics"].items():
            c = claims.get(key)
            claim = ("lower" if c["lower"] else "higher") if c else ""
            judged = f"**{c['verdict']}**" if c else ""
            lines.append(f"| {key} | {_pm(s)} | {fmt(s['p'])} | {s['n']} | {claim} | {judged} |")
        lines.append("")
        for key, c in claims.items():
            s = pair["metrics"][key]
            lines.append(
                f"- The original study's claim that {c['claim']}: **{c['verdict']}** "
                f"(difference {fmt(s['mean'])}, {_ci(s)}, p = {fmt(s['p'])})."
            )
        lines.append("")
    if result["notes"]:
        lines += ["## Rows left out", "", *(f"- {note}" for note in result["notes"]), ""]
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------------


def _mlflow_metrics(result: Mapping) -> dict[str, float]:
    out = {}
    for arm, metrics in result["arms"].items():
        for key, s in metrics.items():
            out.update({f"seeds/{arm}/{key}/{f}": s[f] for f in ("mean", "ci_low", "ci_high")})
    for name, pair in result["pairs"].items():
        for key, s in pair["metrics"].items():
            out.update(
                {f"seeds/{name}/{key}/{f}": s[f] for f in ("mean", "ci_low", "ci_high", "p")}
            )
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m kd.report.seeds",
        description="Aggregate the workspace's experiment over the seeds DVC has run "
        f"(queue them with `{QUEUE_HINT}`).",
    )
    parser.add_argument("--out", type=Path, default=Path("data/seeds"), help="output folder")
    parser.add_argument(
        "--json", type=Path, help="read a saved `dvc exp show --json` instead of running it"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log a `seeds` run")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mlm",
                        help="the MLM experiment (default), or the causal one (causal/dvc.yaml; "
                        "queue its seeds with "
                        f"`{CAUSAL.queue_hint}`); writes to <out>/<family> for causal")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    if family is not MLM and args.out == Path("data/seeds"):
        args.out = args.out / family.name

    tree = json.loads(args.json.read_text()) if args.json else exp_show()
    selection = select(with_comparisons(parse_rows(tree, family), family=family), family=family)
    for note in selection.notes:
        print(note)
    result = aggregate(selection, family=family)
    text = markdown(result)
    write_json(args.out / "seeds.json", result)
    with atomic_file(args.out / "seeds.md") as f:
        f.write(text)
    print(text)
    with start_run(
        "seeds", arm=None if family is MLM else family.name,
        params={"seeds": result["seeds"], "runs": [r["label"] for r in result["runs"]]},
        enabled=not args.no_mlflow,
    ) as run:
        # One aggregate, no curve: step 0.
        run.log_metrics(_mlflow_metrics(result), step=0)
        run.log_artifact(args.out / "seeds.md")
        run.log_artifact(args.out / "seeds.json")
    return result


if __name__ == "__main__":
    cli.run(main)
