"""pin_inputs: the library versions (checked against requirements.lock) and the offline assets'
file hashes, in one file every computing stage depends on (kd/inputs.py).

    python -m stages.pin_inputs data/inputs.json

The path comes from dvc.yaml (``${paths.inputs}``) rather than params.yaml: this stage reads no
params, so a broken params.yaml cannot stop it after DVC has removed its output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kd import inputs
from kd.core import cli
from kd.core.io import write_json


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="where to write the pins (paths.inputs)")
    args = ap.parse_args(argv)
    pinned = inputs.pin()
    write_json(args.out, pinned)
    libs = ", ".join(f"{k} {v}" for k, v in pinned["libraries"].items())
    print(f"pinned {libs}; assets: "
          + ", ".join(f"{k} ({v['package']} {v['version']})" for k, v in pinned["assets"].items()))


if __name__ == "__main__":
    cli.run(main)
