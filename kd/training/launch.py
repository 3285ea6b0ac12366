"""Run a stage module on ``base.nproc`` processes per node, on one node or several.

    python -m kd.training.launch stages.train --arm multi

One process on one node needs no launcher (and keeps Ctrl-C and tracebacks plain); anything
more is started by torchrun, which sets RANK/WORLD_SIZE for kd/core/dist.py. On a multi-GPU
node set base.nproc to the GPU count.

Several nodes form one job when every node runs this same command with torchrun's own
environment variables set (docs/scale.md has a Slurm and a Kubernetes example):

    PET_NNODES=2                        # nodes in the job (or MIN:MAX for an elastic job)
    PET_RDZV_ENDPOINT=head-node:29500   # where the nodes meet (c10d: any node's host:port)
    PET_RDZV_ID=<job id>                # the same on every node of the job, new for each job
    PET_RDZV_BACKEND=c10d               # the default here; torchrun's own default is static
    PET_NODE_RANK=<n>                   # only for the static backend (c10d numbers the nodes)

They are environment variables, not params: they say where a job runs, not what it computes (the
global batch, not the process count, fixes the optimisation), so changing the cluster neither
reruns a DVC stage nor shows up as an experiment's params; a scheduler sets them per job while
dvc.yaml's command stays the same on every node. torchrun reads them itself, so nothing
here renames them. The processes per node are base.nproc, a param (the gate checks the
machine has them): PET_NPROC_PER_NODE, if set, must agree with it, or the launch is refused.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping

from kd.core import cli
from kd.core import dist as kdist
from kd.core.params import load_params


def command(module: str, args: list[str], nproc: int, env: Mapping[str, str] = os.environ
            ) -> tuple[list[str] | None, dict[str, str]]:  # fmt: skip
    """(torchrun command, its environment) for ``module``; (None, env) to run it in-process."""
    env = dict(env)
    per_node = env.get("PET_NPROC_PER_NODE")
    if per_node is not None and per_node != str(nproc):
        raise SystemExit(
            f"PET_NPROC_PER_NODE={per_node} but base.nproc={nproc}: the processes per node are "
            "base.nproc (a param of the training stages); unset PET_NPROC_PER_NODE, or set "
            "base.nproc to it"
        )
    n = kdist.nodes(env)
    if "WORLD_SIZE" in env or (nproc == 1 and n == 1):
        return None, env  # already a torchrun worker, or one process
    exe = kdist.torchrun(nproc)
    if n == 1 and "PET_RDZV_ENDPOINT" not in env:
        return [exe, "--standalone", f"--nproc-per-node={nproc}", "-m", module, *args], env
    if "PET_RDZV_ENDPOINT" not in env or "PET_RDZV_ID" not in env:
        raise SystemExit(
            f"PET_NNODES={env.get('PET_NNODES', '1')} asks for a multi-node job, which needs "
            "PET_RDZV_ENDPOINT (host:port where the nodes meet, e.g. the first node's) and "
            "PET_RDZV_ID (one id per job, the same on every node): set both on every node"
        )
    env.setdefault("PET_RDZV_BACKEND", "c10d")
    return [exe, f"--nproc-per-node={nproc}", "-m", module, *args], env


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m kd.training.launch <module> [args...]")
    module, args = sys.argv[1], sys.argv[2:]
    cmd, env = command(module, args, load_params().base.nproc)
    if cmd is None:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    cli.run(main)
