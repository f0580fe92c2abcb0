"""The packed sparse checkpoint (``owlctl export --format packed``): nonzeros + bitmask, loaded back bit-exactly.

Directory layout:
    packed.json                 schema owlctl.packed/1: every tensor's name, shape, dtype, encoding, nonzero
                                count and the sha256 of its dense bytes; tied names; sizes; the source
    model.packed.safetensors    for a packed weight W (the prunable Linears' 2-D weights):
                                  "<name>.values"  the nonzeros of W in row-major order, W's own dtype
                                  "<name>.bitmask" uint8, numpy.packbits(bit pattern of W != 0, little order)
                                every other tensor dense under its own name
    config.json, generation_config.json, tokenizer files, owlctl records (allocation, report, source)

"Nonzero" is decided on the bit pattern, not the value, so -0.0 and NaN survive the round trip: unpacking
scatters the stored values back and every tensor is bit-identical to the original (the loader checks the
sha256 of each one). At 70% sparsity in float32 a packed weight costs 0.3 x 4 bytes + 1/8 byte per weight,
about 0.33 of dense.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from owlctl.errors import FormatError, ModelError

PACKED_JSON = "packed.json"
PACKED_WEIGHTS = "model.packed.safetensors"


_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def torch_dtype(name: Any, where: str) -> Any:
    """The torch dtype named in a packed header, from a fixed list (never an attribute looked up from a file)."""
    import torch

    if name not in _DTYPES:
        raise FormatError(f"{where}: dtype {name!r} is not one owlctl writes ({', '.join(_DTYPES)})",
                          hint="the packed header was edited or is corrupt; re-export with `owlctl export --format "
                               "packed`")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
            "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}[name]


def _bits_view(t: Any) -> Any:
    """The tensor reinterpreted as same-width integers (nonzero test on bit patterns)."""
    import torch

    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width) if t.dtype != width else t


def tensor_sha256(t: Any) -> str:
    import torch

    c = t.detach().contiguous().cpu()
    return hashlib.sha256(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"").hexdigest()


def pack_tensor(w: Any) -> tuple[Any, Any, int]:
    """W (any shape) -> (values 1-D in W's dtype, packed bitmask uint8, nonzero count).

    Works on the integer view of W's bytes in numpy (bf16 has no numpy dtype; boolean indexing there is
    several times faster than torch's)."""
    import numpy as np
    import torch

    flat = w.detach().contiguous().cpu().reshape(-1)
    ints = _bits_view(flat).numpy()
    nz = ints != 0
    values = torch.from_numpy(ints[nz].copy()).view(w.dtype)
    bits = np.packbits(nz, bitorder="little")
    return values, torch.from_numpy(bits), int(values.numel())


def unpack_tensor(values: Any, bitmask: Any, shape: list[int], dtype: Any) -> Any:
    import numpy as np
    import torch

    numel = 1
    for s in shape:
        numel *= s
    nz = np.unpackbits(bitmask.numpy(), count=numel, bitorder="little").view(bool)
    if int(np.count_nonzero(nz)) != values.numel() or values.dtype != dtype:
        raise FormatError(f"bitmask has {int(np.count_nonzero(nz))} set bits for {values.numel()} {values.dtype} "
                          f"values (expected {dtype})",
                          hint="the packed file is corrupt; re-export it with `owlctl export --format packed`")
    vals = _bits_view(values.contiguous()).numpy()
    out = np.zeros(numel, dtype=vals.dtype)
    out[nz] = vals  # bit patterns, not values: -0.0 and NaN come back unchanged
    return torch.from_numpy(out).view(dtype).reshape(shape)


def is_packed(path: str | Path) -> bool:
    """True for a directory written by ``owlctl export --format packed``."""
    p = Path(path)
    return (p / PACKED_JSON).is_file() and (p / PACKED_WEIGHTS).is_file()


def _packable(model: Any) -> set[str]:
    from owlctl.families import resolve

    layout = resolve(model)
    names = set()
    for i in range(layout.num_blocks):
        for lname in layout.linear_names:
            names.add(f"{layout.block_name(i)}.{lname}.weight")
    return names


def _pack_state(state: dict, packable: set[str]) -> tuple[dict, list[dict], int]:
    """(tensors to store, one header entry per name, dense bytes): prunable 2-D weights as values + bitmask,
    everything else dense, tied weights (e.g. lm_head = embed_tokens) stored once."""
    tensors: dict[str, Any] = {}
    entries: list[dict] = []
    seen: dict[tuple, str] = {}
    dense_bytes = 0
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            entries.append({"name": name, "alias_of": seen[key]})
            continue
        if key is not None:
            seen[key] = name
        t = t.detach().cpu().contiguous()
        dense_bytes += t.numel() * t.element_size()
        e = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
             "sha256": tensor_sha256(t)}
        if name in packable and t.dim() == 2:
            values, bits, nnz = pack_tensor(t)
            tensors[f"{name}.values"] = values
            tensors[f"{name}.bitmask"] = bits
            e.update(encoding="bitmask", nnz=nnz, numel=t.numel())
        else:
            tensors[name] = t.clone()
            e.update(encoding="dense")
        entries.append(e)
    return tensors, entries, dense_bytes


def write_packed(model: Any, out_dir: Path, source_dir: Path | None, model_ref: dict, command: str = "export",
                 tok: Any = None) -> dict:
    """Write the packed files of ``model`` into ``out_dir`` (an empty, temporary directory). Returns the header
    (an owlctl.packed document)."""
    from safetensors.torch import save_file

    from owlctl import __version__

    tensors, entries, dense_bytes = _pack_state(model.state_dict(), _packable(model))
    from owlctl.formats._io import header
    from owlctl.formats.checkpoint import copy_side_files
    from owlctl.formats.kinds import schema_name

    save_file(tensors, str(out_dir / PACKED_WEIGHTS), metadata={"owlctl.schema": schema_name("packed"),
                                                                 "owlctl.version": __version__})
    copy_side_files(source_dir, out_dir, tok, model)
    packed_bytes = (out_dir / PACKED_WEIGHTS).stat().st_size
    packed_w = [e for e in entries if e.get("encoding") == "bitmask"]
    numel, nnz = sum(e["numel"] for e in packed_w), sum(e["nnz"] for e in packed_w)
    head = {
        **header("packed", command, model_ref),
        "model_type": model.config.model_type, "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "encoding": {"bitmask": "numpy.packbits(bit pattern != 0, bitorder='little') over the row-major tensor",
                     "values": "nonzeros in row-major order, original dtype"},
        "tensors": entries,
        "packed_tensors": len(packed_w),
        "packed_numel": numel,
        "packed_nnz": nnz,
        "realised_sparsity": 1 - nnz / numel if numel else 0.0,
        "dense_bytes": dense_bytes,
        "packed_bytes": packed_bytes,
        "size_ratio": packed_bytes / dense_bytes if dense_bytes else None,
    }
    from owlctl.formats.documents import validate

    (out_dir / PACKED_JSON).write_text(json.dumps(validate("packed", head), indent=2, allow_nan=False) + "\n")
    return head


def read_header(path: str | Path) -> dict:
    from owlctl.formats._io import read_json

    return read_json(Path(path) / PACKED_JSON, "packed", remake="owlctl export CHECKPOINT --format packed -o DIR")


def load_state_dict(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The dense state dict of a packed directory, every tensor bit-identical to the exported one."""
    from safetensors.torch import load_file

    path = Path(path)
    head = read_header(path)
    stored = load_file(str(path / PACKED_WEIGHTS))
    state: dict[str, Any] = {}
    for e in head["tensors"]:
        if "alias_of" in e:
            continue
        name, dtype = e["name"], torch_dtype(e.get("dtype"), f"{path / PACKED_JSON}: tensor {e.get('name')!r}")
        try:
            if e["encoding"] == "bitmask":
                t = unpack_tensor(stored[f"{name}.values"], stored[f"{name}.bitmask"], e["shape"], dtype)
            else:
                t = stored[name]
        except KeyError as k:
            raise FormatError(f"{path / PACKED_WEIGHTS} lacks tensor {k}", hint="the packed export is incomplete; "
                              "re-export it") from None
        if verify and tensor_sha256(t) != e["sha256"]:
            raise FormatError(f"tensor {name} does not match its recorded sha256",
                              hint="the packed file is corrupt; re-export it")
        state[name] = t
    for e in head["tensors"]:
        if "alias_of" in e:
            state[e["name"]] = state[e["alias_of"]]
    return state


def load_packed(path: str | Path, verify: bool = True) -> Any:
    """Rebuild the transformers CausalLM of a packed directory (CPU, eval mode, use_cache off)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    head = read_header(path)
    state = load_state_dict(path, verify=verify)
    try:
        config = AutoConfig.from_pretrained(str(path))
        dtype = torch_dtype(head.get("torch_dtype") or "float32", str(path / PACKED_JSON))
        try:  # skip the random initialisation: every tensor is overwritten below
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from contextlib import nullcontext as no_init_weights
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"transformers could not build the model of {path}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FormatError(f"{path}: the stored tensors do not match the model built from config.json "
                          f"({str(e).splitlines()[0]})", hint="config and weights disagree; re-export") from None
    if hasattr(model, "tie_weights"):  # no_init_weights skips tying; tied names share one tensor again
        model.tie_weights()
    model.eval()
    model.config.use_cache = False
    return model
