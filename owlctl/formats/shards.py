"""Writing a safetensors checkpoint tensor by tensor, in any order, with every shard's header planned upfront.

The names, dtypes and shapes of all tensors are known before the first one is computed (from the model
skeleton), so each shard's header (with owlctl's metadata) is written when the shard is created and each
tensor is written at its own offset as soon as it exists, then freed: a streamed prune never holds more than
one block of output, and no weight file is copied a second time to add metadata.

The result is the layout transformers writes and reads: one ``model.safetensors``, or
``model-0000N-of-0000M.safetensors`` shards plus ``model.safetensors.index.json`` ({"metadata":
{"total_size"}, "weight_map": {name: file}}). Each file is a standard safetensors file: an 8-byte
little-endian header length, the JSON header (padded with spaces to a multiple of 8), then the tensors'
bytes back to back in header order.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owlctl.errors import FormatError

# torch dtype name -> (safetensors dtype, bytes per element)
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2), "float64": ("F64", 8),
          "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1), "uint8": ("U8", 1),
          "bool": ("BOOL", 1), "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1)}
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # what hub uploads and most loaders handle comfortably


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Shard:
    path: Path
    entries: list[Entry]
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> absolute file offsets
    pending: set[str] = field(default_factory=set)
    fd: int | None = None


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def plan_shards(entries: list[Entry], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list[Entry]]:
    """Entries in order, cut into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _header(entries: list[Entry], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    head: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    rel: dict[str, tuple[int, int]] = {}
    pos = 0
    for e in entries:
        head[e.name] = {"dtype": DTYPES[e.dtype][0], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        rel[e.name] = (pos, pos + e.nbytes)
        pos += e.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, rel


class ShardWriter:
    """Write the planned tensors into ``directory`` in any order; ``close`` checks that every one arrived and
    writes the index. Each shard file is created (header written, file sized) when its first tensor
    arrives and closed when its last one has been written."""

    def __init__(self, directory: Path, entries: list[Entry], metadata: dict[str, str],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        for e in entries:
            if e.dtype not in DTYPES:
                raise FormatError(f"cannot store {e.name}: dtype {e.dtype} has no safetensors code")
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise FormatError("duplicate tensor names in the checkpoint plan")
        self.directory = Path(directory)
        groups = plan_shards(entries, max_shard_bytes)
        n = len(groups)
        self.shards = [_Shard(self.directory / ("model.safetensors" if n == 1 else
                                                f"model-{k + 1:05d}-of-{n:05d}.safetensors"), g)
                       for k, g in enumerate(groups)]
        self.metadata = {"format": "pt", **metadata}
        self.where: dict[str, tuple[_Shard, Entry]] = {}
        for s in self.shards:
            s.pending = {e.name for e in s.entries}
            for e in s.entries:
                self.where[e.name] = (s, e)
        self.total_size = sum(e.nbytes for e in entries)

    def _open(self, s: _Shard) -> int:
        if s.fd is None:
            head, rel = _header(s.entries, self.metadata)
            s.fd = os.open(s.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(s.fd, memoryview(head), 0)
            os.ftruncate(s.fd, len(head) + sum(e.nbytes for e in s.entries))
            s.offsets = {k: (a + len(head), b + len(head)) for k, (a, b) in rel.items()}
        return s.fd

    def write(self, name: str, tensor: Any) -> None:
        """Write one planned tensor (any device; it is copied to the host for the write)."""
        if name not in self.where:
            raise FormatError(f"tensor {name} is not in the checkpoint plan")
        s, e = self.where[name]
        if name not in s.pending:
            raise FormatError(f"tensor {name} was written twice")
        if dtype_name(tensor.dtype) != e.dtype or tuple(tensor.shape) != e.shape:
            raise FormatError(f"tensor {name} is {dtype_name(tensor.dtype)} {tuple(tensor.shape)}, the plan says "
                              f"{e.dtype} {e.shape}")
        fd = self._open(s)
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            _pwrite_all(fd, memoryview(t.view(_u8()).numpy()), s.offsets[name][0])
        s.pending.discard(name)
        if not s.pending:
            os.close(fd)
            s.fd = None

    def close(self) -> list[Path]:
        """Check completeness, write the index (sharded layouts) and return the weight files."""
        missing = sorted(n for s in self.shards for n in s.pending)
        if missing:
            self.abort()
            raise FormatError(f"checkpoint incomplete: {len(missing)} tensors never written (first: {missing[0]})")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {e.name: s.path.name for s in self.shards for e in s.entries}}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [s.path for s in self.shards]

    def abort(self) -> None:
        for s in self.shards:
            if s.fd is not None:
                os.close(s.fd)
                s.fd = None


def _u8() -> Any:
    import torch

    return torch.uint8


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    while data:
        n = os.pwrite(fd, data[: 1 << 30], offset)
        data, offset = data[n:], offset + n


def state_entries(model: Any) -> list[tuple[str, Any]]:
    """(name, tensor) of what a checkpoint of ``model`` stores, in module order: every parameter once (a tied
    parameter under its first name, as transformers saves it) and the persistent buffers."""
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for n, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + n, p))
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                out.append((prefix + n, b))
    return out


def plan_of(model: Any, dtype: Any = None) -> list[Entry]:
    """The checkpoint plan of ``model`` (meta tensors are fine): floating tensors stored as ``dtype`` when
    given, others as they are."""
    entries = []
    for name, t in state_entries(model):
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        entries.append(Entry(name, dtype_name(dt), tuple(t.shape)))
    return entries
