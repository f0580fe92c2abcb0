"""The Python API: one module per subcommand, each with a frozen config dataclass and one function.

    import owlctl
    from owlctl.ops.prune import PruneConfig
    summary = owlctl.prune(PruneConfig(model="builtin:smollm2-135m", output=None, uniform=True, target_sparsity=0.5))

The functions are re-exported lazily at the top level (``owlctl.prune``, ``owlctl.profile`` ...); here they
live in their modules (``owlctl.ops.prune.prune``), which import torch only when called.
"""
