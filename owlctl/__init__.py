"""owlctl: prune large language models with OWL (Outlier Weighed Layerwise sparsity).

The Python API mirrors the CLI: one function per subcommand (see ``owlctl.ops``). Importing this
package is cheap; torch and transformers load only when a function that needs them is called.
"""

__version__ = "0.1.0"

# function name -> module in owlctl.ops
_OPS = {"profile": "profile", "allocate": "allocate", "prune": "prune", "nm": "prune", "evaluate": "evaluate",
        "finetune": "finetune", "export": "export", "bench": "bench"}


def __getattr__(name: str):  # lazy: `import owlctl` must not import torch
    if name in _OPS:
        import importlib

        return getattr(importlib.import_module(f"owlctl.ops.{_OPS[name]}"), name)
    raise AttributeError(f"module 'owlctl' has no attribute {name!r}")
