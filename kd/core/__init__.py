"""The small core every stage runs: validated params, atomic I/O, MLflow tracking, the runtime
(device, precision, threads, seed), process groups, the optimiser and where each arm's outputs live.

Nothing here imports from another kd/ package: every other layer builds on this one."""
