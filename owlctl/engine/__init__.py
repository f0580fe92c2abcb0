"""Work on a live model, one sub-package per concern:

    models/       where a model's files are (hub, local, built-ins, the cache), its config, loading it
    data/         calibration and evaluation text: sources and splits, token ids, BOS, fingerprints
    calibration/  block-input capture, the layer-by-layer driver, the profile and prune passes
    evaluation/   perplexity, zero-shot tasks, the sparsity audit
    recovery/     LoRA finetuning that keeps the pruned zeros
    search/       `owlctl search`: the level database, the held-out objective, the evolutionary search
"""
