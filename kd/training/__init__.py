"""The training stages (train@<arm>, causal_train@<arm>): the loop shared by every arm, resumable
checkpoints, gradient norms and per-term attribution, cheaper CPU dropout, FLOP counts and the
torchrun launcher. Builds on kd/core, kd/data, kd/distill."""
