"""The per-block level database: every decoder block pruned at every level of the grid, kept on disk.

How levels are built: on the *uniform path*. Blocks are visited in order; block l's statistics come from
the inputs it receives when every earlier block is pruned at the target level (exactly what
``prune --uniform`` feeds it), block l is pruned at each level from its dense weights with those
statistics, and the target level then produces the next block's inputs. Why this path and not the dense
one: (1) the uniform candidate assembled from the database IS ``prune --uniform`` (bit for bit), so the
baseline the search must beat is measured exactly; (2) a real ``prune --allocation`` calibrates every block
on pruned-model activations, and a candidate near the target sees activations close to the uniform path's,
much closer than the dense model's. A candidate whose earlier blocks sit at other levels would have seen
slightly different inputs in a real run; the search measures that gap on its winner (``verify``).

Layout of DIR: ``manifest.json`` (what the levels were built from; a resumed or reused database must
match), then per block ``block_LLL/dense.safetensors`` (the dense prunable weights) and
``block_LLL/k{+K}.safetensors`` per level offset K, holding per Linear its non-zero bitmask (packed bits)
and, for methods that change weights (SparseGPT), the non-zero values; a mask-only method (magnitude,
Wanda) stores no values, they are the dense ones. ``block_LLL/done`` marks a finished block, so an
interrupted build resumes at the first unfinished block. Memory while building: one block plus the
calibration activations.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from owlctl.engine.search.space import Space
from owlctl.errors import InputError


def _block_dir(root: Path, i: int) -> Path:
    return root / f"block_{i:03d}"


def _level_name(k: int) -> str:
    return f"k{k:+d}.safetensors"


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _pack(weight: Any, dense: Any) -> dict:
    """{bits, [values]} of one pruned matrix (values only when they differ from the dense weights)."""
    import numpy as np
    import torch

    nz = weight != 0
    bits = torch.from_numpy(np.packbits(nz.reshape(-1).cpu().numpy(), bitorder="little"))
    out = {"bits": bits}
    if not torch.equal(weight, torch.where(nz, dense, torch.zeros_like(dense))):
        out["values"] = weight[nz].cpu()
    return out


def _unpack(parts: dict, dense: Any) -> Any:
    import numpy as np
    import torch

    nz = np.unpackbits(parts["bits"].numpy(), count=dense.numel(), bitorder="little").astype(bool)
    mask = torch.from_numpy(nz).view(dense.shape)
    if "values" not in parts:
        return torch.where(mask, dense, torch.zeros_like(dense))
    out = torch.zeros_like(dense)
    out[mask] = parts["values"].to(dense.dtype)
    return out


class LevelStore:
    """Reads and writes the database of one search; caches assembled blocks (LRU, ``cache_mb``)."""

    def __init__(self, root: Path, manifest: dict, cache_mb: float = 1024.0) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self.cache_bytes, self.limit = 0, int(cache_mb * 2**20)
        self.dense_cache: dict[int, dict] = {}

    # ------------------------------------------------------------------------------------------- writing
    def done(self, i: int) -> bool:
        return (_block_dir(self.root, i) / "done").is_file()

    def write_block(self, i: int, dense: dict, levels: dict[int, dict]) -> None:
        d = _block_dir(self.root, i)
        d.mkdir(parents=True, exist_ok=True)
        _save(dense, d / "dense.safetensors")
        for k, weights in levels.items():
            flat = {f"{n}.{part}": t for n, w in weights.items() for part, t in _pack(w, dense[n]).items()}
            _save(flat, d / _level_name(k))
        (d / "done").write_text("")

    # ------------------------------------------------------------------------------------------- reading
    def dense(self, i: int) -> dict:
        if i not in self.dense_cache:
            self.dense_cache = {i: self._load(_block_dir(self.root, i) / "dense.safetensors")}
        return self.dense_cache[i]

    def _load(self, path: Path) -> dict:
        """A database file, or a clear error naming the damaged block (it is rebuilt once removed)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise InputError(f"the search database {self.root} is damaged: {path.name} of {path.parent.name} "
                             f"cannot be read ({e})",
                             hint=f"delete {path.parent} (that block is rebuilt on the next run) or the whole "
                                  "database") from None

    def weights(self, i: int, k: int) -> dict:
        """{linear name: weight} of block i at level offset k."""
        if (i, k) in self.cache:
            self.cache.move_to_end((i, k))
            return self.cache[(i, k)]
        flat = self._load(_block_dir(self.root, i) / _level_name(k))
        dense = self.dense(i)
        parts: dict[str, dict] = {}
        for name, t in flat.items():
            lin, part = name.rsplit(".", 1)
            parts.setdefault(lin, {})[part] = t
        out = {n: _unpack(p, dense[n]) for n, p in parts.items()}
        self._remember((i, k), out)
        return out

    def _remember(self, key: tuple[int, int], out: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in out.values())
        self.cache[key] = out
        self.cache_bytes += size
        while self.cache_bytes > self.limit and len(self.cache) > 1:
            _k, old = self.cache.popitem(last=False)
            self.cache_bytes -= sum(t.numel() * t.element_size() for t in old.values())


def open_store(root: Path, manifest: dict, cache_mb: float = 1024.0) -> LevelStore:
    """The database at ``root``: created with ``manifest``, or reused when its manifest is the same."""
    root = Path(root)
    path = root / "manifest.json"
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"the search database {root} is damaged: its manifest.json cannot be read ({e})",
                             hint=f"delete {root} (the search rebuilds it) or give another --db") from None
        if have != manifest:
            diff = sorted(k for k in set(have) | set(manifest) if have.get(k) != manifest.get(k))
            raise InputError(f"the search database {root} was built for other settings (differs in: "
                             f"{', '.join(diff)})", hint="give another --db directory, or delete this one")
    else:
        if root.exists() and any(root.iterdir()):
            raise InputError(f"--db {root} exists and is not a search database",
                             hint="give an empty or new directory")
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".manifest.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return LevelStore(root, manifest, cache_mb)


def level_targets(space: Space) -> dict[int, tuple[float | None, tuple[int, int] | None]]:
    """prune_block's target for every level offset."""
    if space.nm is not None:
        return {k: (None, (int(space.value(k)), space.nm[1])) for k in space.levels}
    return {k: (space.value(k), None) for k in space.levels}
