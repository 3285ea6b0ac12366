"""The README and docs/ say what the code and the committed results say, and stay short.

- every results table a committed file holds is generated from it (``python -m kd.docs``) and
  equal to what the file gives; any other table of numbers names the commit that produced it;
- the code map's layer order is the order the imports allow, and it names every module;
- the links and repository paths the pages name exist, and the README fits a first reading.

All static: a few seconds, no model, no DVC run.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from dagcheck import project_imports

from kd import docs

PAGES = docs.pages(REPO)


def test_every_generated_table_equals_what_its_files_give() -> None:
    assert docs.stale(REPO) == [], "rewrite them with `python -m kd.docs`"
    names = {m["name"] for page in PAGES for m in docs.BLOCK.finditer(page.read_text())}
    assert names == set(docs.TABLES), f"tables no page shows: {sorted(set(docs.TABLES) - names)}"


def test_a_number_that_moved_in_a_result_file_or_a_page_is_caught(tmp_path: Path) -> None:
    for rel in ["README.md", "docs", "data/metrics", "data/train", "data/probe"]:
        src, dst = REPO / rel, tmp_path / rel
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    assert docs.stale(tmp_path) == []
    # The committed result changes (a rerun), the docs do not.
    comparison = tmp_path / "data/metrics/comparison.json"
    text = comparison.read_text()
    assert '"arms/logit/test/logit_kl_t1": 2.67' in text
    comparison.write_text(text.replace('"arms/logit/test/logit_kl_t1": 2.67',
                                       '"arms/logit/test/logit_kl_t1": 2.77'))
    assert "README.md: mlm-results" in docs.stale(tmp_path)
    # A hand edit inside a generated table.
    comparison.write_text(text)
    page = tmp_path / "docs/causal.md"
    page.write_text(page.read_text().replace("| 114.1 |", "| 104.1 |", 1))
    assert docs.stale(tmp_path) == ["docs/causal.md: causal-results"]
    docs.main(["--root", str(tmp_path)])
    assert docs.stale(tmp_path) == []


# --- tables of numbers that no committed file holds name their commit ---------------------------

# A measured value: a number with a decimal point, a thousands separator or a unit ("2.696",
# "1,024", "10.1 %", "2.55 s"); a bare small integer is more often a setting than a result.
NUMBER = re.compile(r"^[~≈<>≤≥+−-]?\d[\d,.]*\s*(%|×|x|s|ms|min|MiB|GiB|GB|MB|pt)?$")
UNIT = re.compile(r"[.,]|\d\s*[^\d\s]")
COMMIT = re.compile(r"\bcommits? ([0-9a-f]{7,40})\b")


def _tables(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of each Markdown table outside the generated blocks."""
    spans, start, generated = [], None, False
    for i, line in enumerate([*lines, ""]):
        generated = (generated or line.startswith("<!-- generated:")) and \
            not line.startswith("<!-- end generated")
        if line.startswith("|") and not generated:
            start = i if start is None else start
        elif start is not None:
            spans.append((start, i - 1))
            start = None
    return spans


def _numbers(row: str) -> int:
    cells = [c.strip().strip("*`").strip() for c in row.strip().strip("|").split("|")]
    return sum(bool(NUMBER.match(c) and UNIT.search(c)) for c in cells)


def test_every_other_table_of_numbers_names_the_commit_that_made_it() -> None:
    """A table of measured numbers no committed file holds (wall times, benchmarks) cannot be
    regenerated, so it must say where it came from: its command, machine and commit. The
    commit is the part a test can check: within the paragraph above the table or just below."""
    missing = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for first, last in _tables(lines):
            if sum(_numbers(row) for row in lines[first + 2:last + 1]) < 2:
                continue  # a table of words (parameters, messages), not of results
            around = "\n".join(lines[max(0, first - 15):first] + lines[last + 1:last + 8])
            if not COMMIT.search(around):
                missing.append(f"{page.relative_to(REPO)}:{first + 1}: {lines[first][:60]}")
    assert not missing, ("tables of numbers that neither come from `python -m kd.docs` nor "
                         "name the commit that produced them:\n  " + "\n  ".join(missing))


def test_the_commits_the_pages_name_exist() -> None:
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO,
                             capture_output=True, text=True)
    if shallow.returncode or shallow.stdout.strip() != "false":
        pytest.skip("no full git history here")
    named = {h for page in PAGES for h in COMMIT.findall(page.read_text())}
    unknown = [h for h in sorted(named) if subprocess.run(
        ["git", "cat-file", "-e", f"{h}^{{commit}}"], cwd=REPO, capture_output=True).returncode]
    assert not unknown, f"commits named in the docs that this repository does not have: {unknown}"


# --- the code map ----------------------------------------------------------------------------------

CODE_MAP = REPO / "docs" / "code-map.md"


def _layer(module: str) -> str | None:
    """The code map's package for a module name: ``kd.core.params`` -> ``kd/core``,
    ``kd.inputs`` -> ``kd/inputs.py``; None for ``kd`` itself."""
    parts = module.split(".")
    if parts[0] != "kd" or len(parts) == 1:
        return None
    return f"kd/{parts[1]}" if (REPO / "kd" / parts[1]).is_dir() else f"kd/{parts[1]}.py"


def _code_map() -> dict[str, list[str]]:
    """Package -> the modules its rows name, in the table's order."""
    rows: dict[str, list[str]] = {}
    package = None
    for line in CODE_MAP.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or re.fullmatch(r"-+", cells[0]):
            continue
        if cells[0].startswith("`"):
            package = cells[0].strip("`")
            rows[package] = []
        if package:
            rows[package] += [m.strip("` ") for m in cells[1].split(",") if m.strip("` ")]
    rows.pop("package", None)
    return rows


def test_each_package_of_the_code_map_imports_only_packages_above_it() -> None:
    order = [p for p in _code_map() if p.startswith("kd/")]
    below = set()
    for path in sorted((REPO / "kd").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        me = _layer(".".join(rel.parts))
        if me is None:
            continue
        for name in project_imports(ast.parse(path.read_text())):
            other = _layer(name)
            if other and other != me and other in order and order.index(other) > order.index(me):
                below.add(f"{path.relative_to(REPO)} imports {other}, which is listed below {me}")
    assert not below, "docs/code-map.md's layer order disagrees with the imports:\n  " + \
        "\n  ".join(sorted(below))


def test_the_code_map_names_every_module() -> None:
    rows = _code_map()
    # The cross-tokenizer library (kd/causal/xtok) is no stage's code yet and has a page of its own.
    files = [p for p in (REPO / "kd").rglob("*.py") if "xtok" not in p.parts
             and p.name not in ("__init__.py", "__main__.py")]
    missing = []
    for path in files:
        rel = path.relative_to(REPO)
        package = _layer(".".join(rel.with_suffix("").parts))
        named = package in rows and (package.endswith(".py")  # a module that is its own layer
                                     or "/".join(rel.parts[2:]) in rows[package])
        if not named:
            missing.append(rel.as_posix())
    assert not missing, f"modules docs/code-map.md does not name: {sorted(missing)}"
    assert set(rows) - {"stages"} <= {_layer(f"kd.{p.stem}") for p in (REPO / "kd").iterdir()
                                      if p.is_dir() or p.suffix == ".py"}, "packages that are gone"


# --- the pages themselves ----------------------------------------------------------------------------


def test_the_readme_fits_a_first_reading() -> None:
    n = len((REPO / "README.md").read_text().splitlines())
    assert n < 250, f"README.md has {n} lines: move the detail to a page of docs/"


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
PATH = re.compile(r"(?<![\w/.])((?:kd|stages|tests|docs|\.ci|causal)/[\w./*<>-]*[\w*>])")


def test_every_link_and_repository_path_the_pages_name_exists() -> None:
    missing = []
    for page in PAGES:
        text = page.read_text()
        for target, _ in LINK.findall(text):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)}: link {target}")
        for path in PATH.findall(text):
            if "*" not in path and "<" not in path and not (REPO / path).exists():
                missing.append(f"{page.relative_to(REPO)}: {path}")
    assert not missing, "named but not in the repository:\n  " + "\n  ".join(sorted(set(missing)))
