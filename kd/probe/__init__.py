"""The probe stages: what a model is good for downstream (a linear probe and a short fine-tune on
one labelled text set). Builds on kd/core."""
