"""The evaluate stages: every student judged against the teacher on fixed batches, and the
least-squares fidelity of its representations. Builds on kd/core, kd/data, kd/distill."""
