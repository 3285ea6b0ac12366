"""Cross-tokenizer distillation: a student whose tokenizer is not the teacher's (issue #25).

One idea per module: ``tokenizer`` trains the student's byte-level BPE; ``pieces`` says which
bytes each token id stands for; ``align`` finds the byte boundaries both tokenizations share and
the positions they make comparable; ``vocab_map`` projects teacher ids onto student ids;
``coverage`` reports how much of the teacher's mass that projection keeps; ``losses`` holds ULD
and the mapped divergence; ``bpb`` scores either model in bits per byte, the one unit two
tokenizers have in common.
"""
