"""`python -m kd.preflight`: validate everything (kd/preflight/__init__.py), then write the marker."""

from __future__ import annotations

from kd.core import cli
from kd.core.params import load_params
from kd.preflight import check


def main() -> None:
    p = load_params()
    check(p)
    p.paths.params_ok.parent.mkdir(parents=True, exist_ok=True)
    p.paths.params_ok.write_text("params.yaml is valid\n")


if __name__ == "__main__":
    cli.run(main)
