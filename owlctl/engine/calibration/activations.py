"""Where the hidden states between blocks are kept: on the compute device (the default), in host memory, or
in files (``--offload-activations device|cpu|disk``).

At 128 x 2048 tokens and hidden 8192 the hidden states of one block boundary are 8.6 GB in float32; a GPU
that holds one 70B block may not also hold them. ``cpu`` keeps them in host memory and moves one batch at a
time to the device; ``disk`` writes each batch to a file in a temporary directory (``$TMPDIR``) and maps it
back when the batch is needed. The values are the same in every mode (plain copies).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

MODES = ("device", "cpu", "disk")


class Activations:
    """One set of per-batch hidden states (batch b -> tensor), in the chosen place."""

    def __init__(self, mode: str, device: str, root: Path | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"activation offload must be one of {MODES}, got {mode!r}")
        self.mode, self.device = mode, device
        self.items: list[Any] = []
        self.root = root
        self.dir: Path | None = None
        if mode == "disk":
            self.root = root if root is not None else Path(tempfile.mkdtemp(prefix="owlctl-activations-"))
            self.dir = Path(tempfile.mkdtemp(dir=self.root))

    def new(self) -> "Activations":
        """An empty set in the same place (the next block boundary)."""
        return Activations(self.mode, self.device, self.root)

    def __len__(self) -> int:
        return len(self.items)

    def append(self, t: Any) -> None:
        t = t.detach()
        if self.mode == "device":
            self.items.append(t)
        elif self.mode == "cpu":
            self.items.append(t.to("cpu"))
        else:
            assert self.dir is not None
            path = self.dir / f"{len(self.items)}.bin"
            host = t.to("cpu").contiguous()
            host.reshape(-1).view(_u8()).numpy().tofile(path)
            self.items.append((path, tuple(host.shape), host.dtype))

    def __getitem__(self, b: int) -> Any:
        item = self.items[b]
        if self.mode == "device":
            return item
        if self.mode == "cpu":
            return item.to(self.device)
        import torch

        path, shape, dtype = item
        numel = 1
        for d in shape:
            numel *= d
        return torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(shape).to(self.device)

    def close(self) -> None:
        """Free this set (its files, for disk)."""
        self.items = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def close_root(self) -> None:
        self.close()
        if self.mode == "disk" and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _u8() -> Any:
    import torch

    return torch.uint8
