"""The one owlctl cache directory: converted built-in models, token ids, compiled kernels, exports.

``$OWLCTL_CACHE``, else ``$XDG_CACHE_HOME/owlctl``, else ``~/.cache/owlctl``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("OWLCTL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "owlctl")
    return Path(base)
