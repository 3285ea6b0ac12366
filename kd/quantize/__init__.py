"""The quantize stage: distil, then quantize the exported student (dynamic int8, CPU).
Builds on kd/core, kd/data, kd/distill, kd/evaluation, kd/probe."""
