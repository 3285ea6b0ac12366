"""The results tables of README.md and docs/, written from the committed result files.

    python -m kd.docs            # rewrite every generated table from the files it names
    python -m kd.docs --check    # exit 1 naming each table that disagrees with its files

A table written by hand goes stale the day the pipeline reruns. So each results table that a
committed file holds (``data/metrics/*.json``, ``data/train/*.json``: ``cache: false`` outputs of
the default runs, committed with their ``dvc.lock``) stands in the docs between two markers:

    <!-- generated: mlm-results (python -m kd.docs; from data/metrics/comparison.json) -->
    | ... the table ... |
    <!-- end generated -->

and is rendered here from that file; tests/test_docs.py fails when a block differs from what
its files give. A figure no committed file holds (a wall time, a benchmark) is written by hand
beside the command, machine and commit that produced it. Nothing here runs a model, and no
stage depends on this module: the docs are not results.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"<!-- generated: (?P<name>[\w-]+)[^\n]*-->\n(?P<body>.*?)<!-- end generated -->", re.S
)


def _read(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _pct(x, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def _int(x) -> str:
    return "–" if x is None else f"{x:,}"


def _table(header: list[str], rows: list[list[str]], right: int = 1) -> str:
    """A Markdown table; columns from ``right`` on are numbers, aligned right."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)


def _arms(compared: dict) -> list[str]:
    """The trained arms in comparison.json, in its order (``arms/<name>/...`` keys)."""
    names: list[str] = []
    for key in compared:
        if key.startswith("arms/"):
            name = key.split("/")[1]
            if name not in names:
                names.append(name)
    return names


# --- the MLM study ------------------------------------------------------------------------------

COMPARISON = "data/metrics/comparison.json"


def mlm_results(root: Path) -> str:
    c = _read(root, COMPARISON)

    def row(label: str, get: Callable[[str], object], probe: object) -> list[str]:
        return [label, _num(get("train/logit_kl_t1")), _num(get("test/logit_kl_t1")),
                _pct(get("test/mlm_top1")), _pct(get("test/agreement")),
                _num(get("mean_grad_norm")), _num(get("test/hidden_lstsq")), _pct(probe)]

    rows = [row(f"{arm}{' (headline)' if arm == c['scheme'] else ''}",
                lambda k, arm=arm: c.get(f"arms/{arm}/{k}"), c.get(f"probe/{arm}/linear_acc"))
            for arm in _arms(c)]
    rows.append(row("initial student", lambda k: c.get(f"floor/{k}"),
                    c.get("probe/student_init/linear_acc")))
    rows.append(["teacher", "", "", _pct(c.get("test/teacher_mlm_top1")), "", "", "",
                 _pct(c.get("probe/teacher/linear_acc"))])
    return _table(["student", "train logit loss", "test logit loss", "test MLM top-1",
                   "top-1 agreement with the teacher", "mean grad norm per layer",
                   "hidden MSE (lstsq)", "linear probe"], rows)


def mlm_run(root: Path) -> str:
    corpus = _read(root, "data/metrics/corpus.json")
    tokens = _read(root, "data/metrics/tokens.json")
    teacher = _read(root, "data/metrics/teacher.json")
    probe = _read(root, "data/probe/teacher.json")
    compared = _read(root, COMPARISON)
    trains = {arm: _read(root, f"data/train/{arm}.json") for arm in _arms(compared)}
    rows = [
        ["documents, train / test", f"{_int(corpus['train']['docs'])} / "
         f"{_int(corpus['test']['docs'])}", "data/metrics/corpus.json"],
        ["token blocks, train / test", f"{_int(tokens['train']['blocks'])} / "
         f"{_int(tokens['test']['blocks'])}", "data/metrics/tokens.json"],
        ["tokens, train / test", f"{_int(tokens['train']['tokens'])} / "
         f"{_int(tokens['test']['tokens'])}", "data/metrics/tokens.json"],
        ["teacher's MLM adaptation: steps, held-out masked top-1 / top-5",
         f"{_int(teacher['adapt_steps'])}, {_pct(teacher['top1'])} / {_pct(teacher['top5'])}",
         "data/metrics/teacher.json"],
        *([f"train@{arm}: steps, tokens, model TFLOP", f"{_int(t['steps'])}, {_int(t['tokens'])}, "
           f"{t['flops'] / 1e12:.1f}", f"data/train/{arm}.json"] for arm, t in trains.items()),
        ["scored batches, train / test", f"{compared.get('floor/train/batches')} / "
         f"{compared.get('floor/test/batches')}", COMPARISON],
        ["probe set (BBC News): classes, train / test articles, majority class",
         f"{probe['n_classes']}, {_int(probe['n_train'])} / {_int(probe['n_test'])}, "
         f"{_pct(probe['majority_acc'])}", "data/probe/teacher.json"],
        ["precision, threads, torch", f"{teacher['runtime']['precision']}, "
         f"{teacher['runtime']['threads']}, {teacher['runtime']['torch']}",
         "data/metrics/teacher.json"],
    ]
    return _table(["", "value", "file"], rows, right=3)


def mlm_attribution(root: Path) -> str:
    """Each arm's whole gradient norm per layer, and each loss term's own (the attribution)."""
    rows = []
    layers: list[str] = []
    for arm in _arms(_read(root, COMPARISON)):
        t = _read(root, f"data/train/{arm}.json")
        layers = sorted(k.removeprefix("mean/grad_norm/") for k in t
                        if k.startswith("mean/grad_norm/layer_"))
        groups = [*layers, "embeddings", "projections", "global"]
        rows.append([f"{arm}: the whole gradient",
                     *(_num(t.get(f"mean/grad_norm/{g}")) for g in groups), ""])
        terms = sorted({k.split("/")[2] for k in t if k.startswith("mean/attr/")} - {"cos"},
                       key=lambda term: (term != "logit", term))
        for term in terms:
            cos = t.get(f"mean/attr/cos/{term}~logit", t.get(f"mean/attr/cos/logit~{term}"))
            rows.append([f"{arm}: the {term} term's own",
                         *(_num(t.get(f"mean/attr/{term}/{g}")) for g in groups),
                         "" if term == "logit" else _num(cos)])
    header = ["gradient norm (mean over steps)", *(x.replace("_", " ") for x in layers),
              "embeddings", "projections", "the student's own parameters", "cosine with the logit term"]
    return _table(header, rows)


def mlm_quantize(root: Path) -> str:
    q = _read(root, "data/metrics/quantize.json")
    rows = [
        ["test logit loss", _num(q["fp32/logit_kl_t1"], 4), _num(q["int8/logit_kl_t1"], 4)],
        ["test MLM top-1", _pct(q["fp32/mlm_top1"], 2), _pct(q["int8/mlm_top1"], 2)],
        ["top-1 agreement with the teacher", _pct(q["fp32/agreement"]),
         _pct(q["int8/agreement"])],
        ["top-1 agreement with fp32", "", _pct(q["int8/agreement_with_fp32"])],
        ["linear probe", _pct(q["fp32/probe_linear_acc"]), _pct(q["int8/probe_linear_acc"])],
        ["size on disk", f"{q['fp32/size_bytes'] / 1e6:.1f} MB", f"{q['int8/size_bytes'] / 1e6:.1f} MB"],
        ["int8 linear layers, test batches", "", f"{q['int8/linear_layers']}, {q['test_batches']}"],
    ]
    return _table(["the distilled student", "fp32", q["dtype"]], rows)


# --- the causal study ---------------------------------------------------------------------------


def _perplexity(x) -> str:
    if x is None:
        return "–"
    if x >= 1e4:
        mantissa, exponent = f"{x:.2e}".split("e")
        sup = str(int(exponent)).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
        return f"{mantissa} × 10{sup}"
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def causal_results(root: Path) -> str:
    c = _read(root, "data/metrics/causal.json")
    names = [n for n, v in c.items() if isinstance(v, dict)]
    order = ["teacher", "student_init", *(n for n in names if n not in ("teacher", "student_init"))]
    label = {"teacher": "teacher", "student_init": "initial student"}
    rows = [[label.get(n, n), _perplexity(c[n].get("perplexity")), _num(c[n].get("kl_t1")),
             _num(c[n].get("top1_agreement")), _pct(c[n].get("probe_linear_acc")),
             _num(c[n].get("train_logit_loss")), _num(c[n].get("mean_grad_norm"))]
            for n in order if n in c]
    return _table(["model", "perplexity", "KL(teacher ‖ model), T = 1", "top-1 agreement",
                   "linear probe", "final train logit loss", "mean grad norm per layer"], rows)


@dataclass(frozen=True)
class Table:
    render: Callable[[Path], str]
    sources: tuple[str, ...]  # what the marker names; the render may read a file per arm too


TABLES: dict[str, Table] = {
    "mlm-results": Table(mlm_results, (COMPARISON,)),
    "mlm-run": Table(mlm_run, ("data/metrics/corpus.json", "data/metrics/tokens.json",
                               "data/metrics/teacher.json", "data/train/<arm>.json",
                               COMPARISON, "data/probe/teacher.json")),
    "mlm-attribution": Table(mlm_attribution, ("data/train/<arm>.json",)),
    "mlm-quantize": Table(mlm_quantize, ("data/metrics/quantize.json",)),
    "causal-results": Table(causal_results, ("data/metrics/causal.json",)),
}


def block(name: str, root: Path = ROOT) -> str:
    """The whole generated block for ``name``, markers included."""
    table = TABLES[name]
    return (f"<!-- generated: {name} (python -m kd.docs; from {', '.join(table.sources)}) -->\n"
            f"{table.render(root)}<!-- end generated -->")


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def refresh(text: str, root: Path = ROOT) -> str:
    def one(m: re.Match) -> str:
        if m["name"] not in TABLES:
            raise SystemExit(f"unknown generated table {m['name']!r}: one of {sorted(TABLES)}")
        return block(m["name"], root)

    return BLOCK.sub(one, text)


def stale(root: Path = ROOT) -> list[str]:
    """``page: table`` for every generated block that differs from what its files give."""
    out = []
    for page in pages(root):
        text = page.read_text()
        for m in BLOCK.finditer(text):
            if m["name"] not in TABLES or m[0] != block(m["name"], root):
                out.append(f"{page.relative_to(root)}: {m['name']}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="rewrite nothing; exit 1 if a generated table is out of date")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository (this one)")
    args = ap.parse_args(argv)
    if args.check:
        wrong = stale(args.root)
        if wrong:
            raise SystemExit("tables that disagree with their result files (rewrite them with "
                             "`python -m kd.docs`):\n  " + "\n  ".join(wrong))
        return
    for page in pages(args.root):
        text = page.read_text()
        new = refresh(text, args.root)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(args.root)}")


if __name__ == "__main__":
    main(sys.argv[1:])
