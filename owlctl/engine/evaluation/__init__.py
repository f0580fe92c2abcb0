"""Evaluation of a live model: perplexity with the reference protocol (perplexity), zero-shot tasks through
lm-eval (zeroshot), the sparsity audit (audit), evaluation text and the calibration-overlap check (texts), and
all of them on a model in memory (loaded)."""
