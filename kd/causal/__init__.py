"""The causal-LM family: next-token distillation of decoder-only language models.

``divergences`` holds the losses between next-token distributions (full vocabulary or the
teacher's top-k support) and ``chunked`` computes them a block of positions at a time from the
student's last hidden states, so peak memory does not grow with positions × vocabulary.
``xtok`` is the library for a student with its own tokenizer (issue #25): byte alignment, a
teacher → student vocabulary map, cross-tokenizer losses and bits per byte.
"""
