"""`python -m kd.bench`: the training-step benchmark, never a stage. Builds on every training layer."""
