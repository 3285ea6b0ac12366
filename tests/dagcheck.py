"""The DAG contract, computed: what each stage of dvc.yaml executes and reads, against its deps.

DVC reruns a stage when one of its declared deps or params changes, and only then. So:

- every project file a stage executes must lie under one of its ``deps`` paths. What it
  executes is the import closure of the modules its ``cmd`` runs (``python -m kd.preflight``,
  ``python -m kd.training.launch stages.train``), found with ``ast``, imports inside functions
  included, plus the ``__init__.py`` of every package on the way. A file whose body is only a
  docstring (a package marker) executes nothing and is left out;
- every params key a stage reads must be declared in its ``params``. What it reads is recorded
  while it runs (kd.core.params' trace, ``KD_TRACE_PARAMS``); ``paths.<key>`` reads are declared
  by dvc.yaml's templating instead: the path must be one of the stage's deps or outs.

Used by tests/test_dag_contract.py; ``python tests/dagcheck.py [repo]`` prints the closures.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("kd", "stages")  # the project's own top-level packages
MODULE = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.\w+)*$")
# params keys whose value changes no result, so no stage needs to declare them.
NEUTRAL_KEYS = {
    "paths.checkpoints",  # where resumable checkpoints wait; the result is the same either way
}


@dataclass
class Stage:
    """One resolved stage of dvc.yaml (foreach items expanded, templates filled in)."""

    name: str
    cmd: str
    deps: list[str] = field(default_factory=list)  # paths, relative to the repository
    outs: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # dotted keys of params.yaml


def stages(root: Path) -> list[Stage]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if not stage.cmd:
                continue
            info = Stage(stage.name, stage.cmd if isinstance(stage.cmd, str) else
                         " ".join(stage.cmd))
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    keys = dep.params
                    info.params += list(keys) if not isinstance(keys, dict) else list(keys)
                else:
                    info.deps.append(_rel(root, dep.fs_path))
            info.outs = [_rel(root, o.fs_path) for o in stage.outs]
            out.append(info)
    return out


def _rel(root: Path, path: str) -> str:
    p = Path(path)
    return p.relative_to(root.resolve()).as_posix() if p.is_absolute() else p.as_posix()


def entry_modules(cmd: str) -> list[str]:
    """The project modules a command runs: every ``kd.*`` / ``stages.*`` word in it
    (``python -m kd.training.launch stages.train --arm x`` runs both)."""
    return [word for word in cmd.split() if MODULE.match(word)]


def module_file(root: Path, name: str) -> Path | None:
    """``kd.core.params`` -> ``kd/core/params.py`` (or a package's ``__init__.py``)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def project_imports(tree: ast.AST) -> set[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in ``tree`` may load: the
    module itself and, for ``from pkg import name``, ``pkg.name`` (a submodule, if it is one)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def executes_code(path: Path) -> bool:
    """Whether running ``path`` can do anything: more than a docstring in its body."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def closure(root: Path, modules: list[str]) -> set[str]:
    """The project files that running ``modules`` executes (relative paths)."""
    seen: set[str] = set()
    files: set[Path] = set()
    # `python -m pkg` (and runpy.run_module) runs the package's __main__.py.
    todo = [*modules, *(f"{m}.__main__" for m in modules)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(root, name)
        if path is None:
            continue  # an attribute imported from a module, not a module of its own
        files.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += sorted(project_imports(ast.parse(path.read_text(), str(path))))
    return {p.relative_to(root).as_posix() for p in files if executes_code(p)}


def covered(path: str, declared: list[str]) -> bool:
    """Whether ``path`` is one of ``declared`` or lies inside one of them."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def undeclared_code(root: Path, stage: Stage) -> list[str]:
    """The files ``stage`` executes that none of its deps covers."""
    return sorted(f for f in closure(root, entry_modules(stage.cmd)) if not covered(f, stage.deps))


def undeclared_params(stage: Stage, keys: set[str], values: dict) -> list[str]:
    """The params keys in ``keys`` (read by ``stage``) that its declaration does not cover.

    ``values`` is params.yaml, for ``paths.<key>``: such a read is covered when its path is
    one of the stage's deps or outs (dvc.yaml writes it there through ``${paths.<key>}``).
    """
    missing = []
    for key in sorted(keys):
        if key in NEUTRAL_KEYS:
            continue
        if key.startswith("paths."):
            path = str(values.get("paths", {}).get(key.split(".", 1)[1], "")).rstrip("/")
            if path and any(covered(x, [path]) or covered(path, [x])
                            for x in stage.deps + stage.outs):
                continue
        elif any(key == d or key.startswith(d + ".") for d in stage.params):
            continue
        missing.append(key)
    return missing


def read_traces(folder: Path) -> dict[str, set[str]]:
    """The params keys each stage read, from the trace files kd.core.params wrote in ``folder``."""
    reads: dict[str, set[str]] = {}
    for path in folder.glob("*.json"):
        record = json.loads(path.read_text())
        reads.setdefault(record["stage"], set()).update(record["keys"])
    return reads


if __name__ == "__main__":
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    for s in stages(repo):
        files = sorted(closure(repo, entry_modules(s.cmd)))
        print(f"{s.name}: {len(files)} files; undeclared: {undeclared_code(repo, s) or 'none'}")
        for f in files:
            print(f"    {f}")
