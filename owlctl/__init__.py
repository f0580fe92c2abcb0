"""owlctl: prune large language models with OWL (Outlier Weighed Layerwise sparsity).

The Python API mirrors the CLI: one function per subcommand taking its config dataclass (``owlctl.prune(
PruneConfig(...))``, see ``owlctl.ops``), plus an in-memory API for a model you already hold
(``owlctl.prune_model(model, tokenizer, ...)``, ``owlctl.profile_model``; see ``owlctl.api``). Importing this
package is cheap; torch and transformers load only when a function that needs them is called.
"""

__version__ = "0.1.0"

# function name -> module in owlctl.ops
_OPS = {"profile": "profile", "allocate": "allocate", "prune": "prune", "nm": "prune", "evaluate": "evaluate",
        "finetune": "finetune", "export": "export", "bench": "bench", "search": "search"}
_API = ("prune_model", "profile_model")


def __getattr__(name: str):  # lazy: `import owlctl` must not import torch
    import importlib

    if name in _OPS:
        return getattr(importlib.import_module(f"owlctl.ops.{_OPS[name]}"), name)
    if name in _API:
        return getattr(importlib.import_module("owlctl.api"), name)
    raise AttributeError(f"module 'owlctl' has no attribute {name!r}")
