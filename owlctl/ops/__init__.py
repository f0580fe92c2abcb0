"""The Python API: one function per subcommand, a frozen config dataclass in, a result document out.

    import owlctl
    doc = owlctl.profile(owlctl.ops.profile.ProfileConfig(model="builtin:smollm2-135m", output=...))

Submodules import torch lazily, so `import owlctl.ops` is cheap.
"""

from __future__ import annotations

import importlib

_FUNCS = {"profile": "profile", "allocate": "allocate", "prune": "prune", "nm": "prune",
          "evaluate": "evaluate", "finetune": "finetune", "export": "export", "bench": "bench"}


def __getattr__(name: str):
    if name in _FUNCS:
        return getattr(importlib.import_module(f"owlctl.ops.{_FUNCS[name]}"), name)
    raise AttributeError(f"module 'owlctl.ops' has no attribute {name!r}")
