"""The data layer (stages sample_corpus and tokenize): where the offline assets come from, the
corpus sample, dual tokenization and packing, and MLM masks. Builds on kd/core only."""
