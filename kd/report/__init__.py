"""The report stage and the tools that read across experiments: headline metrics, figures,
report.md, the exported student, seed aggregation and offline plots. Builds on kd/core."""
