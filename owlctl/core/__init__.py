"""Pure tensor math for owlctl: scores, statistics, outlier counts, allocation, masks, the SparseGPT solver.

torch + stdlib only; nothing here imports another owlctl package (DESIGN.md section 2). Masks are bool tensors
with True = PRUNE; sparsities are fractions in [0, 1); weights are (C_out, C_in).
"""
