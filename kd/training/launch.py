"""Run a stage module on ``base.nproc`` processes: in-process for 1, under torchrun for more.

    python -m kd.training.launch stages.train --arm multi

One process needs no launcher (and keeps Ctrl-C and tracebacks plain); several are started by
torchrun, which sets RANK/WORLD_SIZE for kd/core/dist.py. On a multi-GPU node set base.nproc to the
GPU count; on a cluster, call torchrun yourself with the same module.
"""

from __future__ import annotations

import os
import runpy
import sys

from kd.core import cli
from kd.core import dist as kdist
from kd.core.params import load_params


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m kd.training.launch <module> [args...]")
    module, args = sys.argv[1], sys.argv[2:]
    nproc = load_params().base.nproc
    if nproc == 1 or "WORLD_SIZE" in os.environ:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    cmd = [kdist.torchrun(nproc), "--standalone", f"--nproc-per-node={nproc}", "-m", module, *args]
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    cli.run(main)
