"""kd-pipeline: reproducible knowledge distillation of BERT-class language models.

Stage scripts in ``stages/`` are thin; everything they do lives in this package, one idea per
module (docs/code-map.md maps them).
"""
