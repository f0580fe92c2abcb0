"""`owlctl search`: a better layer-wise allocation than OWL's rule, found on a held-out objective.

    space.py     the search space: integer level offsets per block with an exact mean, seeds snapped onto it,
                 level-switch mutations (pure Python)
    database.py  every block pruned at every level, on disk (safetensors per block and level); why levels are
                 built on the uniform path
    build.py     building the database block by block (its own loop over the calibration driver's pieces)
    objective.py KL divergence from the dense model on held-out windows; the evaluation log used to resume
    evolve.py    seeds, then (1 + lambda) evolution with two-stage selection (pure Python)
    run.py       one search on a loaded model, and the real-prune check of its winner
"""
