"""The check_params stage (`python -m kd.preflight`): the one gate, first in every `dvc repro`
(the causal pipeline's, causal_check_params, is kd/preflight/causal.py).

DVC deletes a stage's outputs just before running it, so a stage that discovered bad input itself
would already have lost its previous outputs (and, on a fresh run, the minutes before it). So
everything that params, the models' configs and the input files can tell is checked here, before
any other stage runs, cheapest first:

- params.yaml itself (kd/core/params.py): keys, types, bounds, finite numbers, rules across
  sections (batch / micro-batch / process counts, sequence lengths);
- the machine (host.py): the device and the processes base.nproc asks for;
- the models (models.py): configs and tokenizers, never weights: a weights file exists, the
  tokenizer is the model's, sequences fit the positions, each trained scheme's layer map and
  head counts fit the teacher and the student;
- the inputs (inputs.py): the corpus sample sample_corpus will take, enough text for one
  training step, and the probe's labelled set;

It writes a marker with constant content that every stage depends on, so a bad input stops the
pipeline with nothing deleted, while a good change reruns only the stages that use it.
"""

from __future__ import annotations

from kd.core.params import Params, ParamsError, sharding_problem
from kd.preflight import host, inputs, models


def check(p: Params) -> None:
    # The MLM section's; the causal gate checks causal.train's (each is refused only for its own).
    if problem := sharding_problem(p.train, p.base):
        raise ParamsError(f"params.yaml: {problem}")
    host.check(p)
    host.check_nodes(p.train, p)
    models.check(p)
    inputs.check(p)
