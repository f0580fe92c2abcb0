"""owlctl: prune large language models with OWL (Outlier Weighed Layerwise sparsity).

The Python API mirrors the CLI: one function per subcommand (see ``owlctl.ops``). Importing this
package is cheap; torch and transformers load only when a function that needs them is called.
"""

__version__ = "0.1.0"

_OPS = {"profile", "allocate", "prune", "nm", "evaluate", "finetune", "export", "bench"}


def __getattr__(name: str):  # lazy: `import owlctl` must not import torch
    if name in _OPS:
        from owlctl import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'owlctl' has no attribute {name!r}")
