"""A model streamed from its safetensors files: the skeleton on the ``meta`` device, each module's weights read
(memory-mapped) onto the compute device when the driver reaches it and dropped when it is done.

The skeleton is transformers' own model class built from config.json with every parameter created on
``meta`` (no memory, no initialisation) while buffers stay real: rotary tables and other non-persistent
buffers are computed by the model's own constructor exactly as ``from_pretrained`` computes them. A
parameter shared by several modules (tied embeddings) is one object in the skeleton, so it is materialised
and dropped once for all of its owners.

Memory: the skeleton costs its buffers; a materialised module costs its weights on the device. Each tensor
is read with positional reads into a fresh buffer (from the offsets in the safetensors header) rather than
through a memory map: a mapped tensor is a copy-on-write view of the file, so pruning it in place would
change what the next read of the same tensor returns, and the mapping's pages would stay in this process's
resident set until it exits. The page cache (reclaimable, shared) holds what was read.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from owlctl.errors import ModelError

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a model directory (from the index when sharded). Raises ModelError
    for a directory with pickle weights only: nothing is unpickled."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{index} is not a readable safetensors index ({type(e).__name__})") from None
        return {k: path / v for k, v in wmap.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        refuse_pickle(path)
        raise ModelError(f"{path} has no .safetensors weights")
    out: dict[str, Path] = {}
    for f in files:
        for k in read_header(f):
            out[k] = f
    return out


def refuse_pickle(path: Path) -> None:
    """A model stored only as PyTorch pickle files (.bin / .pt / .pth) is refused: loading one runs code."""
    pickles = sorted(p.name for p in Path(path).iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles and not any(Path(path).glob("*.safetensors")):
        raise ModelError(
            f"{path} stores its weights as PyTorch pickle files ({', '.join(pickles[:3])}); owlctl reads only "
            "safetensors (unpickling a file can run arbitrary code)",
            hint="if you trust the files, convert them once: python -c \"import sys; from transformers import "
                 "AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1], use_safetensors=False)"
                 f".save_pretrained(sys.argv[2])\" {path} {Path(path).name}-safetensors")


def read_header(file: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header (name -> {dtype, shape, data_offsets}), no data read."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("header length out of range")
            head = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelError(f"the weights in {file} cannot be read ({e})",
                         hint="a .safetensors file is truncated or corrupt; download or re-create it") from None
    head.pop("__metadata__", None)
    return head


class Weights:
    """The tensors of a model directory, each read on request into its own buffer (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.files = weight_files(self.path)
        self._headers: dict[Path, tuple[int, dict]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _entry(self, name: str) -> tuple[Path, int, dict]:
        f = self.files[name]
        if f not in self._headers:
            with open(f, "rb") as h:
                n = struct.unpack("<Q", h.read(8))[0]
            self._headers[f] = (8 + n, read_header(f))
        start, head = self._headers[f]
        if name not in head:
            raise ModelError(f"{f} has no tensor {name} although the index names it",
                             hint="the model's index and its files disagree; download or re-create it")
        return f, start, head[name]

    def dtype(self, name: str) -> str:
        return _ST_DTYPES.get(self._entry(name)[2]["dtype"], "unknown")

    def get(self, name: str, device: str = "cpu", dtype: Any = None) -> Any:
        """Tensor ``name`` as a new tensor (never a view of the file), cast to ``dtype`` when floating."""
        import torch

        f, start, e = self._entry(name)
        dt = getattr(torch, _ST_DTYPES.get(e["dtype"], ""), None)
        a, b = e["data_offsets"]
        numel = 1
        for d in e["shape"]:
            numel *= d
        if not isinstance(dt, torch.dtype) or b - a != numel * dt.itemsize:
            raise ModelError(f"the weights in {f} cannot be read (tensor {name}: bad dtype or offsets)",
                             hint="a .safetensors file is truncated or corrupt; download or re-create it")
        t = torch.empty(numel, dtype=dt)
        if numel:
            try:
                got = _read_into(f, start + a, memoryview(t.view(torch.uint8).numpy()))
            except OSError as err:
                raise ModelError(f"the weights in {f} cannot be read ({err})") from None
            if got != b - a:
                raise ModelError(f"the weights in {f} cannot be read (tensor {name} is cut short)",
                                 hint="a .safetensors file is truncated or corrupt; download or re-create it")
        t = t.view(e["shape"])
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device)

    def close(self) -> None:
        self._headers.clear()


def _read_into(file: Path, offset: int, buf: memoryview) -> int:
    """Fill ``buf`` from ``file`` at ``offset`` (a read may return less than asked); bytes read."""
    done = 0
    with open(file, "rb", buffering=0) as h:
        h.seek(offset)
        while done < len(buf):
            n = h.readinto(buf[done:])
            if not n:
                break
            done += n
    return done


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is put on the meta device (buffers stay real)."""
    import torch.nn as nn

    original = nn.Module.register_parameter

    def register(self: Any, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def checkpoint_dtype(config: Any, weights: Weights) -> Any:
    """What ``from_pretrained(dtype="auto")`` picks: the config's dtype, else the first floating tensor's."""
    import torch

    got = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(got, str):
        got = getattr(torch, got, None)
    if isinstance(got, torch.dtype):
        return got
    for name in weights.files:
        dt = getattr(torch, weights.dtype(name))
        if dt.is_floating_point:
            return dt
    return torch.float32


def _renamings(model: Any) -> tuple[list[Any], bool]:
    """transformers' renaming rules from checkpoint names to this model's names (older transformers have
    none), and whether other conversions (merged or split tensors) exist for it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return [], False
    rules = get_model_conversion_mapping(model)
    return [r for r in rules if isinstance(r, WeightRenaming)], any(not isinstance(r, WeightRenaming) for r in rules)


def source_names(model: Any, weights: Weights) -> dict[str, str]:
    """model tensor name -> the name it has in the checkpoint files, by the renamings transformers applies when
    it loads (e.g. GPT-NeoX's ``embed_out`` is the model's ``lm_head``) and the base-model prefix."""
    rules, _ = _renamings(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, str] = {}
    for key in weights.files:
        name = key
        for r in rules:
            name, _ = r.rename_source_key(name)
        out.setdefault(name, key)
        if prefix and not name.startswith(prefix + "."):
            out.setdefault(f"{prefix}.{name}", key)
        elif prefix:
            out.setdefault(name.removeprefix(prefix + "."), key)
    return out


def skeleton(path: Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """transformers' model for ``path`` with its parameters on meta, in ``dtype``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"transformers could not read the config of {path}: {e}") from None
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model
